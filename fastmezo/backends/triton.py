"""Triton backend: the fused table kernel of fastmezo.kernels, one launch per (dtype, a, b) group.

triton is imported on the first question about this backend, never when fastmezo is imported.
"""
from __future__ import annotations

import contextlib
import os
import threading

NAME = "triton"
_launch = None              # fastmezo.kernels.axpbz.axpbz_multi_ once triton imported
_Launches = None            # fastmezo.kernels.axpbz.Launches, likewise
_import_error = None
# The interpreter runs programs on the host with shared module state: one pass at a time.
_interpreter_lock = threading.Lock()


def interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (the values triton itself accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def unavailable_reason(device) -> str | None:
    global _launch, _Launches, _import_error
    if device.type == "cpu":
        if not interpreter_on():
            return ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 in the "
                    "environment before triton is imported")
    elif device.type != "cuda":
        return f"the Triton backend supports CUDA tensors, not {device.type}"
    if _launch is None and _import_error is None:
        try:
            from ..kernels.axpbz import Launches, axpbz_multi_
            _launch, _Launches = axpbz_multi_, Launches
        except Exception as exc:  # noqa: BLE001  (ImportError, or a broken triton install)
            _import_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return _import_error


def run(tensors, outs, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None, pair_delta=None) -> None:
    """The pass (fastmezo.ops.run); pair_delta: also a * x - b * z, pair_delta elements after each output
    (:func:`fastmezo.ops.run_pair`)."""
    if _launch is None:
        unavailable_reason(tensors[0].device)
    lock = _interpreter_lock if tensors[0].device.type == "cpu" else contextlib.nullcontext()
    with lock:
        # The optimizer's passes have one (a, b) per param group: one launch per distinct pair.
        if len(set(a)) == 1 and len(set(b)) == 1:
            _launch(tensors, a[0], b[0], seed, keys, noise, offsets, outs=outs, round_seed=round_seed, load_x=load_x,
                    pair_delta=pair_delta)
            return
        outs = list(tensors) if outs is None else list(outs)
        groups: dict = {}
        for i, coef in enumerate(zip(a, b)):
            groups.setdefault(coef, []).append(i)
        for (a_i, b_i), idx in groups.items():
            _launch([tensors[i] for i in idx], a_i, b_i, seed, [keys[i] for i in idx], noise,
                    [offsets[i] for i in idx], outs=[outs[i] for i in idx], round_seed=round_seed, load_x=load_x,
                    pair_delta=pair_delta)


#: This backend writes both outputs of a pair in one pass (fastmezo.ops.run_pair).
PAIRS = True


def rows_pass(rows, b, seed, key, offsets, noise) -> None:
    """rows[i] <- rows[i] + b * z(seed, key) from the global index offsets[i] (a device tensor), in place
    (fastmezo.kernels.axpbz.rows_pass_: the launch table is built on the device)."""
    from ..kernels.axpbz import rows_pass_
    lock = _interpreter_lock if rows.device.type == "cpu" else contextlib.nullcontext()
    with lock:
        rows_pass_(rows, b, seed, key, offsets, noise)


def prepare_pair(sources, plus, keys, offsets, noise, pair_delta):
    """The pair pass over ``sources`` (fastmezo.ops.run_pair with one b), prepared once and relocatable:
    ``prepared(b, seed, outs_at)`` writes the + outputs at their prepared distances from ``outs_at`` (a
    1-D tensor of their dtype) and the - outputs pair_delta elements after each. It holds no tensor;
    valid while the sources stay where they are."""
    if _Launches is None:
        unavailable_reason(sources[0].device)
    launches = _Launches(sources, keys, noise, offsets, outs=plus, pair_delta=pair_delta, relocatable=True)
    if sources[0].device.type != "cpu":
        return lambda b, seed, outs_at: launches(1.0, b, seed, outs_at=outs_at)

    def interpreted(b, seed, outs_at):
        with _interpreter_lock:
            launches(1.0, b, seed, outs_at=outs_at)
    return interpreted


def prepare(tensors, keys, offsets, noise):
    """The launches of in-place passes over ``tensors`` with one (a, b), prepared once (their tables
    uploaded): ``prepared(a, b, seed, round_seed, load_x)`` is then a pass with no per-tensor host work.
    Valid while the tensors stay where they are."""
    if _Launches is None:
        unavailable_reason(tensors[0].device)
    launches = _Launches(tensors, keys, noise, offsets)
    if tensors[0].device.type != "cpu":
        return launches

    def interpreted(*args, **kwargs):
        with _interpreter_lock:
            launches(*args, **kwargs)
    return interpreted
