"""Reference backend: the plain-torch noise oracle (fastmezo.reference), chunked, any device."""
from .. import reference


def axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None, outs=None):
    outs = outs if outs is not None else [None] * len(tensors)
    for x, out, a_i, b_i, key, offset in zip(tensors, outs, a, b, keys, offsets):
        reference.axpbz_(x, a_i, b_i, seed, key, noise, offset, load_x=load_x, round_seed=round_seed, out=out)
