"""fastmezo.replay: rebuild trained weights from the base weights and a trajectory (fastmezo.trajectory).

    fastmezo.replay(model, "run.jsonl")              # model holds the base weights; afterwards the trained ones
    fastmezo.replay(model, traj, steps=500)          # the weights after the first 500 optimizer steps

Replay runs the passes the stored weights went through in training (see fastmezo.trajectory: the
update alone in exact mode; in place also the +eps / -2 eps / restore passes, which round), through a
fastmezo.plan.Plan with the recorded keys and groups, the coefficients of fastmezo.engine and the
rounding bits of fastmezo.noise.rounding_seed for the same pass indices: on the same backend and dtype
the result is bit-identical to the trained weights. Before anything is written it checks the names,
shapes, dtypes and sha256 of the base weights and the noise contract version.

``python -m fastmezo replay BASE TRAJECTORY OUT`` does the same from files (:func:`add_command`).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import engine
from .noise import NOISE_VERSION, rounding_seed
from .plan import Plan
from .trajectory import ROUNDING_NAMES, Trajectory, _dtype_name, hash_tensors

#: A record's "rounding" -> (perturbation passes round stochastically, the update pass does).
ROUNDED_PASSES = {name: engine.rounding_passes(mode) for mode, name in ROUNDING_NAMES.items()}


def step_passes(strategy: str, record: dict) -> list:
    """The passes a recorded step made over the stored weights: [(a per group, b per group, pass index,
    whether it is the update)], in order (the engine's coefficients and pass indices)."""
    eps, lrs, wds, grads = record["eps"], record["lr"], record["weight_decay"], record["grads"]
    update_pass = record["update_pass"]
    if update_pass is None:
        raise ValueError(f"step {record['step']} was an accumulated step whose micro-batch count was not "
                         "recorded (MeZO.step_accumulated called directly); it cannot be replayed")
    ones, plus, minus = [1.0] * len(eps), list(eps), [-2.0 * e for e in eps]
    inplace = strategy == "inplace"
    skipped = record["skipped"] is not None
    passes = []
    if update_pass == engine.RESTORE:                 # MeZO.step: restore fused into the update
        if inplace:
            passes += [(ones, plus, engine.PLUS, False), (ones, minus, engine.MINUS, False)]
            if skipped:
                passes.append((ones, plus, engine.RESTORE, False))
        restore = eps if inplace else [None] * len(eps)
    elif update_pass > 0 and update_pass % 3 == 0:    # accumulate() x k, then step_accumulated()
        if inplace:
            for j in range(update_pass // 3):
                passes += [(ones, plus, 3 * j + engine.PLUS, False), (ones, minus, 3 * j + engine.MINUS, False),
                           (ones, plus, 3 * j + engine.RESTORE, False)]
        restore = [None] * len(eps)
    else:
        raise ValueError(f"step {record['step']}: update_pass {update_pass} is neither 2 nor a multiple of 3")
    if not skipped:
        coef = [engine.update_coefficients(lr, wd, g, restore_eps=r)
                for lr, wd, g, r in zip(lrs, wds, grads, restore)]
        passes.append(([c[0] for c in coef], [c[1] for c in coef], update_pass, True))
    return passes


def _tensors_of(model_or_named_params, entries) -> list:
    """The tensors the header names, in header order."""
    src = model_or_named_params
    if isinstance(src, torch.nn.Module):
        src = dict(src.named_parameters())
    elif not isinstance(src, dict):
        src = list(src)
        if src and isinstance(src[0], torch.Tensor):
            if len(src) != len(entries):
                raise ValueError(f"replay got {len(src)} tensors, the trajectory's base has {len(entries)}")
            return src
        src = dict(src)
    if any(e["name"] is None for e in entries):
        raise ValueError("the trajectory's tensors have no names: give replay the tensors as a list, in order")
    missing = [e["name"] for e in entries if e["name"] not in src]
    if missing:
        raise ValueError(f"the base weights have no parameter {missing[0]!r} (of {len(missing)} missing) that the "
                         "trajectory trained")
    return [src[e["name"]] for e in entries]


def check_base(trajectory: Trajectory, tensors, check_hash: bool = True) -> None:
    """Contract version, shapes, dtypes and (``check_hash``) sha256 of the base weights against the header."""
    header = trajectory.header
    if header.get("noise_version") != NOISE_VERSION:
        raise ValueError(f"the trajectory was recorded under noise contract v{header.get('noise_version')}, this "
                         f"fastmezo implements v{NOISE_VERSION}: its steps cannot be replayed bit for bit")
    entries = header["base"]["tensors"]
    for e, t in zip(entries, tensors):
        if e["shape"] != list(t.shape) or e["dtype"] != _dtype_name(t.dtype):
            raise ValueError(f"base weight {e['name']!r} is {_dtype_name(t.dtype)} {list(t.shape)}, the trajectory "
                             f"was recorded on {e['dtype']} {e['shape']}")
    if check_hash and hash_tensors([e["name"] for e in entries], tensors) != header["base"]["sha256"]:
        raise ValueError("the base weights' sha256 differs from the trajectory's: these are not the weights the "
                         "run started from (replay would build other weights)")


@torch.no_grad()
def replay(model_or_named_params, trajectory, steps: int | None = None, *, backend=None,
           check_hash: bool = True, fused: int | None = None) -> int:
    """Apply the first ``steps`` optimizer steps of ``trajectory`` (a Trajectory or a file; None: all)
    to the base weights ``model_or_named_params`` (a module, a dict or (name, tensor) pairs, or a list
    of tensors in header order), in place. Returns the number of steps applied.

    ``fused=K``: K steps per pass over the weights with the fused Triton kernel (kernels/replay.py),
    bit-identical to a run trained on the Triton backend (CUDA; CPU under TRITON_INTERPRET=1)."""
    if not isinstance(trajectory, Trajectory):
        trajectory = Trajectory.load(trajectory)
    header = trajectory.header
    entries = header["base"]["tensors"]
    tensors = _tensors_of(model_or_named_params, entries)
    check_base(trajectory, tensors, check_hash)
    records = [r for r in trajectory.records if steps is None or r["step"] < steps]
    _check_gaps(records, header["strategy"], header.get("start_step", 0))
    if len({r["noise"] for r in records}) > 1:
        raise ValueError("the trajectory changes its noise kind between steps: not supported by replay")
    plan = Plan(tensors, [e["name"] for e in entries], keys=[e["key"] for e in entries],
                groups=[e["group"] for e in entries], noise=records[0]["noise"] if records else "gaussian",
                backend=backend, one_device=False)
    work = []                       # (seed, [(a per group, b per group, round seed)]), every record checked first
    for record in records:
        passes = []
        rounds = ROUNDED_PASSES.get(record["rounding"])
        if rounds is None:
            raise ValueError(f"step {record['step']} has rounding {record['rounding']!r}; expected one of "
                             f"{', '.join(map(repr, ROUNDED_PASSES))}")
        for a, b, pass_index, is_update in step_passes(header["strategy"], record):
            plan.check_coefficients(a, b, f"step {record['step']}")
            rs = rounding_seed(record["seed"], pass_index) if rounds[is_update] else None
            passes.append((a, b, rs))
        work.append((record["seed"], passes))
    if fused is not None:
        _run_fused(plan, work, fused)
        return len(records)
    for seed, passes in work:
        for a, b, rs in passes:
            plan.run(seed, a, b, round_seed=rs)
    return len(records)


def fused_available(plan: Plan) -> bool:
    """Whether every device of ``plan`` runs the Triton backend on a GPU, where the fused kernel
    gives the bits of the plan's own passes and is worth it."""
    from .backends import triton as triton_backend

    return all(device.type == "cuda" and backend is triton_backend for device, backend, *_ in plan.devices)


def _run_fused(plan: Plan, work, k: int) -> None:
    """The steps ``work`` in chunks of ``k`` per launch of kernels/replay.py, per device and param group."""
    from .backends import triton as triton_backend

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"fused must be a number of steps >= 1, got {k!r}")
    for device, *_ in plan.devices:
        reason = triton_backend.unavailable_reason(device)
        if reason:
            raise ValueError(f"fused replay runs the Triton kernel, which cannot run on {device}: {reason}")
    from .kernels.replay import fused_replay_

    work = [w for w in work if w[1]]                  # steps that made no pass (skipped in exact mode)
    chunks = [work[start:start + k] for start in range(0, len(work), k)]
    for _, _, idx, keys, offsets in plan.devices:
        by_group: dict = {}
        for i, key, off in zip(idx, keys, offsets):
            by_group.setdefault(plan.groups[i], []).append((plan.tensors[i], key, off))
        for g, members in by_group.items():
            tensors, gkeys, goffs = zip(*members)
            for chunk in chunks:
                steps = [(seed, [(a[g], b[g], rs) for a, b, rs in passes]) for seed, passes in chunk]
                with triton_backend._interpreter_lock:
                    fused_replay_(list(tensors), list(gkeys), plan.noise, steps, list(goffs))


def _check_gaps(records, strategy, expected: int) -> None:
    """Step indices missing from the records: steps that counted but were not recorded (a micro-batch
    raised with on_nonfinite="raise"). Exact mode: they changed nothing. In place their passes rounded."""
    for r in records:
        if r["step"] != expected and strategy == "inplace":
            warnings.warn(f"trajectory steps {expected}..{r['step'] - 1} are not recorded; their in-place passes "
                          "rounded the weights, so the replay matches the run only up to float rounding",
                          RuntimeWarning, stacklevel=3)
        expected = r["step"] + 1


# -- python -m fastmezo replay BASE TRAJECTORY OUT ------------------------------------------------------

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _load_base(base: str) -> dict:
    """name -> tensor of a safetensors file, or of a Hugging Face model folder's (sharded) safetensors."""
    from safetensors.torch import load_file

    if os.path.isfile(base):
        return load_file(base)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"base weights {base!r}: no such file or folder")
    files = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{base} holds no .safetensors weights (convert the model with save_pretrained first)")
    tensors = {}
    for f in files:
        tensors.update(load_file(os.path.join(base, f)))
    return tensors


def _by_trajectory_names(weights: dict, entries) -> dict:
    """The header's names -> tensors of ``weights``; a name not in the file is looked up by its
    canonical name (wrapper prefixes such as PEFT's ``base_model.model.`` removed on both sides)."""
    from .noise import canonical_name

    canonical = {canonical_name(k): k for k in weights}
    out = {}
    for e in entries:
        name = e["name"]
        key = name if name in weights else canonical.get(canonical_name(name or ""))
        if key is not None:
            out[name] = weights[key]
    return out


def run_command(args) -> None:
    """The ``replay`` command: base weights + trajectory -> fine-tuned weights (safetensors)."""
    import shutil

    from safetensors.torch import save_file

    trajectory = Trajectory.load(args.trajectory)
    weights = _load_base(args.base)
    named = _by_trajectory_names(weights, trajectory.header["base"]["tensors"])
    device = torch.device(args.device)
    work = {n: t.to(device).contiguous() for n, t in named.items()}
    done = replay(work, trajectory, steps=args.steps, backend=args.backend)
    names = {id(t): k for k, t in weights.items()}
    for name, t in work.items():
        weights[names[id(named[name])]] = t.cpu()
    out = args.out
    if out.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        target = out
    else:
        os.makedirs(out, exist_ok=True)
        target = os.path.join(out, "model.safetensors")
        if os.path.isdir(args.base):          # config and tokenizer files: OUT loads like BASE
            for f in os.listdir(args.base):
                src = os.path.join(args.base, f)
                if os.path.isfile(src) and not f.endswith(".safetensors") and f not in _WEIGHTS:
                    shutil.copy2(src, os.path.join(out, f))
    save_file({k: v.contiguous() for k, v in weights.items()}, target, metadata={"format": "pt"})
    print(f"fastmezo replay: {done} steps applied to {len(work)} tensors; wrote {target}")


def add_command(commands) -> None:
    """Add ``replay`` to the ``fastmezo`` command line's subparsers."""
    sub = commands.add_parser("replay", help="rebuild fine-tuned weights from base weights + a trajectory",
                              description="Apply a fastmezo trajectory (JSON lines) to base weights and write "
                                          "the fine-tuned weights as safetensors.")
    sub.add_argument("base", help="base weights: a Hugging Face model folder or a .safetensors file")
    sub.add_argument("trajectory", help="the trajectory file (MeZO(trajectory=...), MeZOTrainer checkpoints)")
    sub.add_argument("out", help="a .safetensors file, or a folder (model.safetensors, with BASE's config files)")
    sub.add_argument("--steps", type=int, default=None, help="replay only the first STEPS optimizer steps")
    sub.add_argument("--device", default="cpu", help="where the passes run (default cpu; cuda for the GPU kernels)")
    sub.add_argument("--backend", default=None, help="force a backend (triton, native, oracle); default automatic")
    sub.set_defaults(func=run_command)
