"""The torch oracle as a backend: fastmezo.oracle's plain-torch pass, chunked, any device."""
from __future__ import annotations

from .. import oracle

NAME = "oracle"
#: It writes tensor by tensor: a plan records its progress per tensor (fastmezo.plan.Plan.units).
PER_TENSOR = True


def unavailable_reason(device) -> None:
    return None


def run(tensors, outs, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None) -> None:
    outs = [None] * len(tensors) if outs is None else outs
    for x, out, a_i, b_i, key, offset in zip(tensors, outs, a, b, keys, offsets):
        oracle.scale_add_noise_(x, a_i, b_i, seed, key, noise, offset, load_x=load_x, round_seed=round_seed, out=out)
