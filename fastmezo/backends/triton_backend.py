"""Triton backend: one fused kernel launch per tensor (fastmezo.kernels)."""
from ..kernels import axpbz_ as _launch


def axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None, outs=None):
    if round_seed is not None or outs is not None:
        from . import reference_backend  # until the Triton kernel has these (in progress)
        reference_backend.axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x, round_seed, outs)
        return
    for x, a_i, b_i, key, offset in zip(tensors, a, b, keys, offsets):
        _launch(x, a_i, b_i, seed, key, noise, offset=offset, load_x=load_x)
