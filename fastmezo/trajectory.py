"""Trajectories: a MeZO run as its base weights' hash plus a few numbers per step.

A MeZO update is a pure function of the weights, the step's seed, its projected gradients and the
hyper-parameters, so the fine-tuned weights are the base weights plus the list of those numbers:
kilobytes instead of a copy of the model. :func:`fastmezo.replay` rebuilds the weights from them.

    opt = fastmezo.MeZO(groups, lr=1e-6, trajectory=True)        # or trajectory="run.jsonl"
    ...                                                           # train
    opt.trajectory.save("run.jsonl")
    fastmezo.replay(base_model, "run.jsonl")                      # base_model now holds the trained weights

The base weights are hashed when the trajectory starts (``MeZO(trajectory=...)``: the tensors the
optimizer is given are the base weights): sha256 over every tensor's name, dtype, shape and bytes.

File format (``FORMAT``, version ``FORMAT_VERSION``): JSON lines, UTF-8. Line 1 is the header:

    {"format": "fastmezo-trajectory", "format_version": 1, "noise_version": 1, "strategy": "inplace",
     "start_step": 0, "base": {"sha256": "...", "tensors": [{"name": str|null, "shape": [...], "dtype": "bfloat16",
                                              "key": int, "group": int}, ...]}}

then one line per optimizer step, in order:

    {"step": t, "seed": uint64, "grads": [g per group, null when skipped], "lr": [...],
     "weight_decay": [...], "eps": [...], "noise": "gaussian", "rounding": "update"|"stochastic"|"nearest",
     "update_pass": 2 | 3 * micro_batches | null, "skipped": null | "reason"}

``rounding`` is MeZO's ``stochastic_rounding`` of the step: "update" (stochastic in the update pass
only), "stochastic" (in every pass) or "nearest" (round to nearest throughout).
Floats are written with Python's repr (they read back bit for bit); seeds are exact integers.
``update_pass`` is the pass index whose rounding bits the update used (fastmezo.engine: a plain
step's restore+update is pass 2, an accumulated step of k micro-batches updates with pass 3k), and so
also says how many perturb/restore passes the step made. ``key`` is the tensor's noise key and
``group`` its param group (the index into the per-group lists); ``start_step`` the optimizer's step
count when the trajectory started (non-zero when a run resumed from full weights starts one).

What replay must re-run (fastmezo.replay): in exact mode the stored weights change only at the
update pass, so a step is that one pass. In place the weights also go through the +eps and -2 eps
passes (and, for accumulated steps, a restore per micro-batch), each of which rounds, so replay
re-runs every pass the stored weights went through, with the same coefficients and rounding bits:
3 passes a plain step, 3k + 1 an accumulated one, also for skipped steps (whose passes still rounded).
Not recorded: a step that raised (the transaction restored the weights and the step index did not
advance); in place that restore rounds, so replay after one matches the run up to float rounding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import torch

from .noise import NOISE_VERSION

FORMAT = "fastmezo-trajectory"
FORMAT_VERSION = 1
#: The "rounding" of a record for each of MeZO's ``stochastic_rounding`` modes (fastmezo.engine).
ROUNDING_NAMES = {"update": "update", True: "stochastic", False: "nearest"}
_CHUNK = 1 << 28        # bytes hashed per copy to the host: bounded host memory for large GPU tensors


def hash_tensors(names, tensors) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, t in zip(names, tensors):
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        flat = t.detach().reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
        for start in range(0, flat.numel(), _CHUNK):
            h.update(flat[start:start + _CHUNK].cpu().numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(names, tensors) -> list[dict]:
    """The header's tensor entries (key and group filled in at the first step)."""
    return [dict(name=n, shape=list(t.shape), dtype=_dtype_name(t.dtype), key=None, group=None)
            for n, t in zip(names, tensors)]


class Trajectory:
    """The header and the step records of a run (see the module docstring). ``path``: every record
    is also appended to that file as it is made (the header at the first step)."""

    def __init__(self, header: dict, records=None, path=None):
        self.header = header
        self.records: list[dict] = list(records or [])
        self.path = None if path is None else os.fspath(path)
        self._plan = None          # the optimizer's plan already matched against the header
        self._rewrite = False             # records were dropped: the file is rewritten at the next record

    # -- starting, saving, loading ----------------------------------------------------------------
    @classmethod
    def start(cls, named_tensors, strategy: str, path=None) -> "Trajectory":
        """A new trajectory whose base weights are ``named_tensors`` ((name or None, tensor) pairs) as
        they are now."""
        names = [n for n, _ in named_tensors]
        tensors = [t for _, t in named_tensors]
        header = dict(format=FORMAT, format_version=FORMAT_VERSION, noise_version=NOISE_VERSION,
                      strategy=strategy, base=dict(sha256=hash_tensors(names, tensors),
                                                   tensors=describe(names, tensors)))
        return cls(header, path=path)

    @classmethod
    def of_optimizer(cls, optimizer, path=None) -> "Trajectory":
        """A new trajectory of a fastmezo.MeZO whose parameters, as they are now, are the base weights."""
        named = [(n, p) for g in optimizer.param_groups
                 for n, p in zip(g.get("param_names") or [None] * len(g["params"]), g["params"])]
        trajectory = cls.start(named, optimizer.perturbation_mode, path=path)
        trajectory.header["start_step"] = optimizer.step_count
        return trajectory

    def save(self, path) -> None:
        """Write header and records to ``path`` (atomically: a crash leaves the old file)."""
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for line in [self.header] + self.records:
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Trajectory":
        """Read a trajectory file; a clear error for anything that is not one of this version."""
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if not lines or not isinstance(lines[0], dict) or lines[0].get("format") != FORMAT:
            raise ValueError(f"{path} is not a fastmezo trajectory (its first line has no format {FORMAT!r})")
        header = lines[0]
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: trajectory format version {header.get('format_version')}, this fastmezo "
                             f"reads version {FORMAT_VERSION}")
        if any(e.get("key") is None for e in header["base"]["tensors"]):
            raise ValueError(f"{path}: the trajectory has no step (its header was never completed)")
        return cls(header, lines[1:])

    # -- recording (called by fastmezo.MeZO after each step) --------------------------------------
    def record(self, plan, step: int, seed: int, grads, hypers, *, noise: str, rounding,
               update_pass, skipped) -> None:
        """Append step ``step``'s record. The first record completes the header with the plan's noise
        keys and groups; a plan whose tensors no longer match the base raises."""
        if plan is not self._plan:
            self._match(plan)
        while self.records and self.records[-1]["step"] >= step:   # the run went back (a resume)
            self.records.pop()
            self._rewrite = True
        self.records.append(dict(
            step=step, seed=seed, grads=[g if math.isfinite(g) else None for g in grads],
            lr=[h.lr for h in hypers], weight_decay=[h.weight_decay for h in hypers],
            eps=[h.eps for h in hypers], noise=noise, rounding=ROUNDING_NAMES[rounding],
            update_pass=update_pass, skipped=skipped))
        if self.path is not None:
            if self._rewrite or len(self.records) == 1:
                self.save(self.path)
                self._rewrite = False
            else:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(self.records[-1]) + "\n")

    def _match(self, plan) -> None:
        """Fill in (first step) or check the keys and groups of every base tensor from the plan."""
        entries = self.header["base"]["tensors"]
        by_name = all(e["name"] is not None for e in entries) and all(n is not None for n in plan.names)
        if by_name:
            index = {e["name"]: e for e in entries}
            order = [index.get(n) for n in plan.names]
        else:
            order = entries if len(entries) == len(plan.tensors) else [None]
        if len(order) != len(entries) or any(e is None for e in order):
            raise RuntimeError("the optimizer's parameters are not the ones its trajectory started with (names or "
                               "count differ); start a new trajectory for a new parameter set")
        for e, t, key, group, name in zip(order, plan.tensors, plan.keys, plan.groups, plan.names):
            if e["shape"] != list(t.shape) or e["dtype"] != _dtype_name(t.dtype):
                raise RuntimeError(f"parameter {name or '?'} is {_dtype_name(t.dtype)} {list(t.shape)} but the "
                                   f"trajectory's base weights had {e['dtype']} {e['shape']}: the model changed "
                                   "after the trajectory started (build the optimizer after .half()/.to(dtype))")
            if e["key"] is None:
                e["key"], e["group"] = key, group
            elif (e["key"], e["group"]) != (key, group):
                raise RuntimeError(f"parameter {name or '?'} changed its noise key or param group during the run; "
                                   "a trajectory describes one parameter set")
        self._plan = plan
