"""Triton backend: the fused table kernel of fastmezo.kernels, one launch per (dtype, a, b) group."""
from ..kernels.axpbz import axpbz_multi_


def axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None, outs=None):
    # The optimizer's passes have one (a, b) per param group: one launch per distinct pair.
    if len(set(a)) == 1 and len(set(b)) == 1:          # the common case (exact mode's groups): no grouping
        axpbz_multi_(tensors, a[0], b[0], seed, keys, noise, offsets, outs=outs, round_seed=round_seed,
                     load_x=load_x)
        return
    outs = list(tensors) if outs is None else list(outs)
    groups: dict = {}
    for i, coef in enumerate(zip(a, b)):
        groups.setdefault(coef, []).append(i)
    for (a_i, b_i), idx in groups.items():
        axpbz_multi_([tensors[i] for i in idx], a_i, b_i, seed, [keys[i] for i in idx], noise,
                     [offsets[i] for i in idx], outs=[outs[i] for i in idx], round_seed=round_seed,
                     load_x=load_x)
