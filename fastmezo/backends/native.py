"""Native backend: the C++ (OpenMP) and CUDA kernels of the library fastmezo._C (csrc/).

fastmezo._C is loaded on the first question about this backend, never when fastmezo is imported: a
missing or broken library (not built, built against another torch, ...) only makes this backend
unavailable, with the reason, and the others run. The library gives two ways in to the same kernels:
``_C.scale_add_noise`` (a direct call, used for eager passes) and ``_C.register_kernels(device_type)``,
which registers them as the CPU or CUDA kernels of the ``fastmezo::`` operators (fastmezo.ops).
"""
from __future__ import annotations

import importlib
import importlib.util
import threading

NAME = "native"
_LIBRARY = "fastmezo._C"
# The interface this file calls (csrc/bindings/ops.cpp FASTMEZO_API_VERSION): 3 = the direct call
# scale_add_noise and register_kernels into the fastmezo namespace, 4 = and tensor_state (for
# fastmezo.plan_cache), 5 = and call_state (fastmezo.plan), 6 = and bump_versions (fastmezo.ops). A
# library built from older sources is reported, not half used.
API_VERSION = 6

_lock = threading.Lock()
_module = None        # fastmezo._C once loaded
_load_error = None    # the sentence saying why it could not be loaded


def load():
    """fastmezo._C, loading it on first use; None if it cannot be loaded (``load_error()`` says why)."""
    global _module, _load_error
    if _module is not None or _load_error is not None:
        return _module
    with _lock:
        if _module is not None or _load_error is not None:
            return _module
        try:
            missing = importlib.util.find_spec(_LIBRARY) is None
        except Exception:  # noqa: BLE001  (a broken import hook; the import below says more)
            missing = False
        if missing:
            _load_error = ("fastmezo was installed without its native library fastmezo._C (torch was not "
                           "importable at build time, FASTMEZO_NO_NATIVE was set, or the build failed); "
                           "reinstall with `pip install --no-build-isolation .` where torch is installed")
            return None
        try:
            module = importlib.import_module(_LIBRARY)
        except Exception as exc:  # noqa: BLE001  (ImportError: undefined symbol, ABI mismatch, ...)
            _load_error = f"fastmezo._C failed to load: {type(exc).__name__}: {exc}"
            return None
        built = getattr(module, "API_VERSION", 1)
        if built != API_VERSION:
            _load_error = (f"fastmezo._C was built from other sources (interface {built}, this fastmezo needs "
                           f"{API_VERSION}); rebuild it with `pip install --no-build-isolation -e .`")
            return None
        _module = module
    return _module


def load_error() -> str | None:
    """Why fastmezo._C could not be loaded (None if it loaded or was not tried yet)."""
    return _load_error


def unavailable_reason(device) -> str | None:
    """None if the native backend can run tensors on ``device``, else a sentence saying why not."""
    if device.type not in ("cpu", "cuda"):
        return f"the native backend has CPU and CUDA kernels, not {device.type}"
    module = load()
    if module is None:
        return _load_error
    if device.type == "cuda" and not module.WITH_CUDA:
        return "fastmezo was built without CUDA kernels (nvcc was not found, or torch had no CUDA, at build time)"
    return None


def register_kernels(device_type: str) -> None:
    """Register the library's kernels as the ``device_type`` kernels of the fastmezo operators."""
    load().register_kernels(device_type)


def run(tensors, outs, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None) -> None:
    """One native call for all tensors (validated by the caller, and again by the library)."""
    _module.scale_add_noise(tensors, outs, a, b, seed, keys, offsets, noise, load_x, round_seed)
