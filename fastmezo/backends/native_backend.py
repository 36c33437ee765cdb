"""Native backend: the C++ (OpenMP) and CUDA kernels of fastmezo._C (csrc/), one call for all tensors.

fastmezo._C is loaded lazily, on the first question about this backend, never when fastmezo is
imported: a missing or broken native library (not built, built against another torch, ...) only makes
this backend unavailable, with the reason, and the others run (fastmezo.backends). Loading it registers
the operator ``torch.ops.fastmezo_native.axpbz_`` (csrc/bindings/ops.cpp: schema, CPU and CUDA kernels);
its fake (meta) implementation is registered here, so the op works under FakeTensorMode / torch.compile
and passes torch.library.opcheck.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading

import torch

from .._ops import seed_arg

_NAME = "fastmezo._C"

_lock = threading.Lock()
_module = None        # fastmezo._C once loaded
_load_error = None    # the sentence saying why it could not be loaded


def load():
    """fastmezo._C, loading it (and registering the fake implementation) on first use; None if it
    cannot be loaded (then ``load_error()`` says why)."""
    global _module, _load_error
    if _module is not None or _load_error is not None:
        return _module
    with _lock:
        if _module is not None or _load_error is not None:
            return _module
        try:
            missing = importlib.util.find_spec(_NAME) is None
        except Exception:  # noqa: BLE001  (a broken import hook; the import below says more)
            missing = False
        if missing:
            _load_error = ("fastmezo was installed without its native library fastmezo._C (torch was not "
                           "importable at build time, FASTMEZO_NO_NATIVE was set, or the build failed); "
                           "reinstall with `pip install --no-build-isolation .` where torch is installed")
            return None
        try:
            module = importlib.import_module(_NAME)  # registers torch.ops.fastmezo_native
        except Exception as exc:  # noqa: BLE001  (ImportError: undefined symbol, ABI mismatch, ...)
            _load_error = f"fastmezo._C failed to load: {type(exc).__name__}: {exc}"
            return None
        _register_fake()
        _module = module
    return _module


def load_error() -> str | None:
    """Why fastmezo._C could not be loaded (None if it loaded or was not tried yet)."""
    return _load_error


def _register_fake() -> None:
    @torch.library.register_fake("fastmezo_native::axpbz_")
    def _axpbz_fake(tensors, a, b, seed, keys, offsets, noise, load_x) -> None:
        return None  # in-place on its inputs: no outputs, no shapes to propagate


def unavailable_reason(device: torch.device) -> str | None:
    """None if the native backend can run tensors on ``device``, else a sentence saying why not."""
    if device.type not in ("cpu", "cuda"):
        return f"the native backend has CPU and CUDA kernels, not {device.type}"
    module = load()
    if module is None:
        return _load_error
    if device.type == "cuda" and not module.WITH_CUDA:
        return ("fastmezo was built without CUDA kernels (nvcc was not found, or torch had no CUDA, at build "
                "time)")
    return None


def axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None, outs=None):
    """tensors[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i]) over global indices offsets[i] + j, in one
    native call (load_x=False: tensors[i] <- b[i] * z). Arguments are validated by fastmezo.functional."""
    if not tensors:
        return
    if round_seed is not None or outs is not None:
        # Stochastic rounding and out-of-place passes have no native kernels yet: the oracle runs them.
        from . import reference_backend
        reference_backend.axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x, round_seed, outs)
        return
    if load() is None:  # pragma: no cover  (the registry checks availability first)
        raise RuntimeError(_load_error)
    torch.ops.fastmezo_native.axpbz_(list(tensors), [float(v) for v in a], [float(v) for v in b],
                                     seed_arg(int(seed)), [int(k) for k in keys], [int(o) for o in offsets],
                                     int(noise), bool(load_x))
