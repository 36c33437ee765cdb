"""Backend registry: which implementation runs the fused passes for tensors on a given device.

Backends, fastest first:
  triton     Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests)
  native     C++ (OpenMP) and CUDA kernels of the library fastmezo._C (csrc/), loaded lazily
  reference  plain torch (fastmezo.reference), any device, slow but exact

The choice is per call, from the device of the tensors: CUDA tensors go to triton, then native, then
reference; CPU tensors to native, then reference (Triton runs CPU tensors only through its interpreter,
for tests, and only when asked for). ``FASTMEZO_BACKEND`` (or a ``backend=`` argument) names one
explicitly; an explicit choice that cannot run raises BackendUnavailable with the reason, an automatic
choice falls back quietly to the next one that can.
"""
from __future__ import annotations

import os

import torch

NAMES = ("triton", "native", "reference")
ENV_VAR = "FASTMEZO_BACKEND"


def triton_interpreter_on() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's interpreter (the values triton itself accepts)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


_TRITON_IMPORTED = False   # set once triton_backend imported: later questions skip the import machinery


def _triton_reason(device: torch.device) -> str | None:
    global _TRITON_IMPORTED
    if device.type == "cuda" and _TRITON_IMPORTED:
        return None                 # asked once per pass (and per module forward in exact mode)
    if device.type == "cpu":
        if not triton_interpreter_on():
            return ("Triton runs CPU tensors only through its interpreter: set TRITON_INTERPRET=1 in "
                    "the environment before triton is imported")
    elif device.type != "cuda":
        return f"the Triton backend supports CUDA tensors, not {device.type}"
    try:
        from . import triton_backend  # noqa: F401  (imports triton)
    except Exception as exc:  # ImportError, or a broken triton install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    _TRITON_IMPORTED = True
    return None


def _native_reason(device: torch.device) -> str | None:
    from . import native_backend  # cheap: fastmezo._C itself loads on this first question
    return native_backend.unavailable_reason(device)


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run tensors on ``device``, else a sentence saying why not."""
    if name == "triton":
        return _triton_reason(device)
    if name == "native":
        return _native_reason(device)
    if name == "reference":
        return None
    raise ValueError(f"unknown fastmezo backend {name!r}; expected one of {', '.join(NAMES)}")


def _automatic_order(device: torch.device):
    if device.type == "cuda":
        return ("triton", "native", "reference")
    return ("native", "reference")


def requested_backend(backend: str | None = None) -> str | None:
    """The explicitly requested backend name (argument first, then $FASTMEZO_BACKEND), or None."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is not None and name not in NAMES and name != "auto":
        raise ValueError(f"unknown fastmezo backend {name!r} (from {'argument' if backend else ENV_VAR}); "
                         f"expected one of {', '.join(NAMES)} or 'auto'")
    return None if name == "auto" else name


def select(device: torch.device, backend: str | None = None) -> str:
    """Name of the backend that will run tensors on ``device``."""
    name = requested_backend(backend)
    if name is not None:
        reason = unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailable(f"fastmezo backend {name!r} cannot run {device.type} tensors: {reason}")
        return name
    order = _automatic_order(device)
    for candidate in order:
        if unavailable_reason(candidate, device) is None:
            if candidate != order[0]:
                _warn_fallback(device, order[0], candidate)
            return candidate
    return "reference"  # pragma: no cover  (reference always runs)


_warned: set = set()


def _warn_fallback(device: torch.device, preferred: str, chosen: str) -> None:
    """Say once per (device type, backend) why the automatic choice fell back: a CUDA run on the torch
    oracle is ~100x slower, and a silent fallback (e.g. fastmezo run from a source checkout without
    `pip install -e .`, where fastmezo.kernels does not exist) looks like a slow GPU."""
    key = (device.type, chosen)
    if key in _warned:
        return
    _warned.add(key)
    import warnings
    warnings.warn(f"fastmezo: the {preferred} backend cannot run {device.type} tensors "
                  f"({unavailable_reason(preferred, device)}); using the {chosen} backend instead, which is "
                  "slower. Set FASTMEZO_BACKEND to choose explicitly.", RuntimeWarning, stacklevel=3)


def get(name: str):
    """The module implementing backend ``name``: it has ``axpbz_(tensors, a, b, seed, keys, offsets, noise)``."""
    if name == "triton":
        from . import triton_backend as module
    elif name == "native":
        from . import native_backend as module
    elif name == "reference":
        from . import reference_backend as module
    else:
        raise ValueError(f"unknown fastmezo backend {name!r}; expected one of {', '.join(NAMES)}")
    return module
