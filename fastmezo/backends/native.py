"""Native backend: the C++ (OpenMP) and CUDA kernels of fastmezo._C (csrc/), one call for all tensors.

fastmezo._C is loaded lazily, on the first question about this backend, never when fastmezo is
imported: a missing or broken native library (not built, built against another torch, ...) only makes
this backend unavailable, with the reason, and the others run (fastmezo.backends). Loading it registers
the operators ``torch.ops.fastmezo_native.axpbz_`` (in place, optional stochastic rounding) and
``torch.ops.fastmezo_native.axpbz_out`` (out of place) (csrc/bindings/ops.cpp: schemas, CPU and CUDA
kernels); their fake (meta) implementations are registered here, so the ops work under FakeTensorMode /
torch.compile and pass torch.library.opcheck. Everything runs natively: stochastic rounding
(docs/noise.md section 8) and the out-of-place pass included.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading

import torch

from .._ops import seed_arg

_NAME = "fastmezo._C"
# The operator set this file calls (csrc/bindings/ops.cpp FASTMEZO_API_VERSION): 2 = axpbz_ with
# round_seed, and axpbz_out. A library built from older sources is reported, not half used.
API_VERSION = 2

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
        built = getattr(module, "API_VERSION", 1)
        if built != API_VERSION:
            _load_error = (f"fastmezo._C was built from older sources (operator API {built}, this fastmezo needs "
                           f"{API_VERSION}: stochastic rounding and out-of-place passes); rebuild it with "
                           "`pip install --no-build-isolation -e .`")
            return None
        _register_fake()
        _module = module
    return _module


def load_error() -> str | None:
    """Why fastmezo._C could not be loaded (None if it loaded or was not tried yet)."""
    return _load_error


def _register_fake() -> None:
    @torch.library.register_fake("fastmezo_native::axpbz_")
    def _axpbz_fake(tensors, a, b, seed, keys, offsets, noise, load_x, round_seed=None) -> None:
        return None  # in-place on its inputs: no outputs, no shapes to propagate

    @torch.library.register_fake("fastmezo_native::axpbz_out")
    def _axpbz_out_fake(tensors, outs, a, b, seed, keys, offsets, noise, round_seed=None) -> None:
        return None  # writes into the given outs: nothing to allocate


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
    native call (load_x=False: tensors[i] <- b[i] * z). With ``outs``: outs[i] <- a[i] * tensors[i] +
    b[i] * z, tensors only read (load_x must be True). ``round_seed`` (uint64): float16 / bfloat16 results
    are rounded stochastically with the draws of Philox stream 2 keyed by it (docs/noise.md section 8).
    Arguments are validated by fastmezo.functional (and again by the operators)."""
    if not tensors:
        return
    if load() is None:  # pragma: no cover  (the registry checks availability first)
        raise RuntimeError(_load_error)
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    keys = [int(k) for k in keys]
    offsets = [int(o) for o in offsets]
    round_arg = None if round_seed is None else seed_arg(int(round_seed))
    if outs is None:
        torch.ops.fastmezo_native.axpbz_(list(tensors), a, b, seed_arg(int(seed)), keys, offsets, int(noise),
                                         bool(load_x), round_arg)
        return
    if not load_x:
        raise ValueError("an out-of-place pass reads its tensors: load_x must be True with outs")
    torch.ops.fastmezo_native.axpbz_out(list(tensors), list(outs), a, b, seed_arg(int(seed)), keys, offsets,
                                        int(noise), round_arg)
