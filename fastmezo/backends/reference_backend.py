"""Reference backend: the plain-torch noise oracle (fastmezo.reference), chunked, any device."""
from .. import reference


def axpbz_(tensors, a, b, seed, keys, offsets, noise, load_x=True):
    for x, a_i, b_i, key, offset in zip(tensors, a, b, keys, offsets):
        reference.axpbz_(x, a_i, b_i, seed, key, noise, offset, load_x=load_x)
