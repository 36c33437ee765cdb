"""Which implementation of the fused pass runs tensors of a given device.

Implementations (modules of this package, each with ``NAME``, ``unavailable_reason(device)`` and
``run(tensors, outs, a, b, seed, keys, offsets, noise, load_x, round_seed)``), fastest first:
  triton   Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for tests)
  native   C++ (OpenMP) and CUDA kernels of the library fastmezo._C (csrc/), loaded lazily
  oracle   plain torch (fastmezo.oracle), any device: slow, the definition the others must match

The automatic order is per device type: CUDA tensors go to triton, then native, then the oracle; CPU
tensors to native, then the oracle (Triton runs CPU tensors only through its interpreter, and only when
asked for). ``FASTMEZO_BACKEND`` (or a per-call ``backend=``) names one; an explicit choice that cannot
run raises BackendUnavailable with the reason, the automatic choice falls back with a one-time warning.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import native, oracle, triton

ENV_VAR = "FASTMEZO_BACKEND"
ALL = (triton, native, oracle)
NAMES = tuple(b.NAME for b in ALL)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def by_name(name: str):
    """The backend module called ``name`` (a ValueError naming the choices otherwise)."""
    for backend in ALL:
        if backend.NAME == name:
            return backend
    raise ValueError(f"unknown fastmezo backend {name!r}; expected one of {', '.join(NAMES)} or 'auto'")


def requested(backend=None):
    """The explicitly requested backend module (argument first, then $FASTMEZO_BACKEND), or None for
    the automatic choice. Validates the name without loading anything."""
    if backend is not None and not isinstance(backend, str):
        if backend in ALL:
            return backend
        raise TypeError(f"backend must be a name ({', '.join(NAMES)}, 'auto') or None, got {type(backend).__name__}")
    name = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if name is None or name == "auto":
        return None
    try:
        return by_name(name)
    except ValueError:
        origin = "argument" if backend is not None else ENV_VAR
        raise ValueError(f"unknown fastmezo backend {name!r} (from {origin}); expected one of "
                         f"{', '.join(NAMES)} or 'auto'") from None


def _automatic_order(device: torch.device):
    return (triton, native, oracle) if device.type == "cuda" else (native, oracle)


def select(device: torch.device, backend=None):
    """The backend module that runs tensors on ``device``: the requested one (or BackendUnavailable),
    else the first of the automatic order that can."""
    chosen = requested(backend)
    if chosen is not None:
        reason = chosen.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(f"fastmezo backend {chosen.NAME!r} cannot run {device.type} tensors: {reason}")
        return chosen
    order = _automatic_order(device)
    for candidate in order:
        if candidate.unavailable_reason(device) is None:
            if candidate is not order[0]:
                _warn_fallback(device, order[0], candidate)
            return candidate
    return oracle  # pragma: no cover  (the oracle always runs)


_warned: set = set()


def _warn_fallback(device: torch.device, preferred, chosen) -> None:
    """Say once per (device type, backend) why the automatic choice fell back: a CUDA run on the torch
    oracle is about a hundred times slower, and a silent fallback (fastmezo run from a source checkout
    without an install, say) looks like a slow GPU."""
    key = (device.type, chosen.NAME)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"fastmezo: the {preferred.NAME} backend cannot run {device.type} tensors "
                  f"({preferred.unavailable_reason(device)}); using the {chosen.NAME} backend instead, which is "
                  f"slower. Set {ENV_VAR} to choose explicitly.", RuntimeWarning, stacklevel=4)
