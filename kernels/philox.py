"""Triton device functions of the noise contract (docs/noise.md, version 1).

Our own Philox4x32-10 rather than ``tl.randn``: tl.randn's counter layout changed between Triton
releases, it uses one of the four output words per call, and its int32 offsets overflow past 2**31
elements. Here one Philox call feeds 4 normals (two Box-Muller pairs) or 128 Rademacher signs, and
counters are 64-bit.
"""
import triton
import triton.language as tl

PI = 3.141592653589793


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on uint32 tensors; returns the 4 output words."""
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    W0: tl.constexpr = 0x9E3779B9
    W1: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(M0, _c0) ^ c3 ^ k1
        c1 = tl.mul(M1, _c2, sanitize_overflow=False)
        c3 = tl.mul(M0, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, W0, sanitize_overflow=False)
        k1 = tl.add(k1, W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform_from_bits(x):
    """(2 * (x >> 9) + 1) * 2**-24: a float32 in (0, 1), exact, identical on every backend."""
    return ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def box_muller(x_a, x_b):
    """Two standard normals: r = sqrt(-2 ln u_a), t = pi * (2 u_b - 1), (r cos t, r sin t)."""
    u_a = uniform_from_bits(x_a)
    u_b = uniform_from_bits(x_b)
    r = tl.sqrt(-2.0 * tl.log(u_a))
    t = PI * (2.0 * u_b - 1.0)
    return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def noise_tile(ctr, cols, seed_lo, seed_hi, key, NOISE: tl.constexpr):
    """z for a tile of elements: ``ctr`` is an int64 [ROWS, 1] tensor of Philox counters (element
    index // elements per call), ``cols`` the [1, PER_CALL] lane of each element within its call.
    NOISE 0: Gaussian (4 lanes); NOISE 1: Rademacher (128 lanes). Returns float32 [ROWS, PER_CALL].
    The stream id (counter word 3) is NOISE itself."""
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0) + NOISE
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    if NOISE == 0:
        n0, n1 = box_muller(x0, x1)
        n2, n3 = box_muller(x2, x3)
        z = tl.where(cols == 0, n0, tl.where(cols == 1, n1, tl.where(cols == 2, n2, n3)))
    else:
        word_index = cols // 32
        word = tl.where(word_index == 0, x0, tl.where(word_index == 1, x1, tl.where(word_index == 2, x2, x3)))
        bit = (word >> (cols % 32).to(tl.uint32)) & 1
        z = 1.0 - 2.0 * bit.to(tl.float32)
    return z
