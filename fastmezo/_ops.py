"""torch.library operators of fastmezo: schemas with mutation annotations and fake (meta)
implementations, so the passes compose with torch.compile and other torch machinery. The real
implementation picks a backend per device (fastmezo.backends).

Seeds are uint64 in the noise contract but torch schemas carry int64: the functional layer passes
the seed's two's-complement value and the op masks it back.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .noise import MASK64


def _axpbz_impl(tensors: List[torch.Tensor], a: List[float], b: List[float], seed: int, keys: List[int],
           offsets: List[int], noise: int, load_x: bool = True, backend: str = "auto",
           round_seed: Optional[int] = None) -> None:
    """tensors[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i]) in place (z from offset offsets[i]);
    fp16/bf16 results are rounded stochastically with the bits of ``round_seed`` when it is given.

    All tensors share one device; the caller (fastmezo.functional) validates every argument first.
    """
    if not tensors:
        return
    name = backends.select(tensors[0].device, None if backend == "auto" else backend)
    backends.get(name).axpbz_(tensors, a, b, seed & MASK64, keys, offsets, noise, load_x=load_x,
                              round_seed=None if round_seed is None else round_seed & MASK64)


axpbz_ = torch.library.custom_op("fastmezo::axpbz_", mutates_args=("tensors",), device_types=None)(_axpbz_impl)


@axpbz_.register_fake
def _axpbz_fake(tensors, a, b, seed, keys, offsets, noise, load_x=True, backend="auto", round_seed=None) -> None:
    return None


def _axpbz_out_impl(tensors: List[torch.Tensor], outs: List[torch.Tensor], a: List[float], b: List[float], seed: int,
              keys: List[int], offsets: List[int], noise: int, backend: str = "auto",
              round_seed: Optional[int] = None) -> None:
    """outs[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i]); tensors are only read (exact mode's
    perturbed copies). Rounding as in axpbz_."""
    if not tensors:
        return
    name = backends.select(tensors[0].device, None if backend == "auto" else backend)
    backends.get(name).axpbz_(tensors, a, b, seed & MASK64, keys, offsets, noise, load_x=True,
                              round_seed=None if round_seed is None else round_seed & MASK64, outs=outs)


axpbz_out = torch.library.custom_op("fastmezo::axpbz_out", mutates_args=("outs",), device_types=None)(_axpbz_out_impl)


@axpbz_out.register_fake
def _axpbz_out_fake(tensors, outs, a, b, seed, keys, offsets, noise, backend="auto", round_seed=None) -> None:
    return None


def seed_arg(seed: int) -> int:
    """uint64 seed -> the int64 with the same bits (what the schema carries)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _plain(tensors) -> bool:
    """True when the call can skip the dispatcher: eager mode, no tracing, plain tensors. The
    dispatcher's handling of a 400-tensor list costs ~1 ms of host time per pass (measured), as much
    as the pass itself on a 1.3B-parameter model."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(t) in _PLAIN_TYPES for t in tensors)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def call_axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x, backend, round_seed) -> None:
    """fastmezo::axpbz_, through the dispatcher when something may be tracing it (torch.compile,
    FakeTensorMode, tensor subclasses), else straight to its implementation (same code, less host
    time). Mutated tensors get their version counters bumped either way."""
    if _plain(tensors):
        _axpbz_impl(tensors, a, b, seed, keys, offsets, noise, load_x, backend, round_seed)
        torch.autograd.graph.increment_version(tensors)
    else:
        axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x, backend, round_seed)


def call_axpbz_out(tensors, outs, a, b, seed, keys, offsets, noise, backend, round_seed) -> None:
    """fastmezo::axpbz_out, dispatched as :func:`call_axpbz_`."""
    if _plain(tensors) and _plain(outs):
        _axpbz_out_impl(tensors, outs, a, b, seed, keys, offsets, noise, backend, round_seed)
        torch.autograd.graph.increment_version(outs)
    else:
        axpbz_out(tensors, outs, a, b, seed, keys, offsets, noise, backend, round_seed)
