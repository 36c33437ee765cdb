"""torch.library operators of fastmezo: schemas with mutation annotations and fake (meta)
implementations, so the passes compose with torch.compile and other torch machinery. The real
implementation picks a backend per device (fastmezo.backends).

Seeds are uint64 in the noise contract but torch schemas carry int64: the functional layer passes
the seed's two's-complement value and the op masks it back.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import backends
from .noise import MASK64


@torch.library.custom_op("fastmezo::axpbz_", mutates_args=("tensors",), device_types=None)
def axpbz_(tensors: List[torch.Tensor], a: List[float], b: List[float], seed: int, keys: List[int],
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


@axpbz_.register_fake
def _axpbz_fake(tensors, a, b, seed, keys, offsets, noise, load_x=True, backend="auto", round_seed=None) -> None:
    return None


@torch.library.custom_op("fastmezo::axpbz_out", mutates_args=("outs",), device_types=None)
def axpbz_out(tensors: List[torch.Tensor], outs: List[torch.Tensor], a: List[float], b: List[float], seed: int,
              keys: List[int], offsets: List[int], noise: int, backend: str = "auto",
              round_seed: Optional[int] = None) -> None:
    """outs[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i]); tensors are only read (exact mode's
    perturbed copies). Rounding as in axpbz_."""
    if not tensors:
        return
    name = backends.select(tensors[0].device, None if backend == "auto" else backend)
    backends.get(name).axpbz_(tensors, a, b, seed & MASK64, keys, offsets, noise, load_x=True,
                              round_seed=None if round_seed is None else round_seed & MASK64, outs=outs)


@axpbz_out.register_fake
def _axpbz_out_fake(tensors, outs, a, b, seed, keys, offsets, noise, backend="auto", round_seed=None) -> None:
    return None


def seed_arg(seed: int) -> int:
    """uint64 seed -> the int64 with the same bits (what the schema carries)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed
