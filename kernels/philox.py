"""Triton device functions of the noise contract (docs/noise.md, version 1).

Our own Philox4x32-10 rather than ``tl.randn``: tl.randn's counter layout changed between Triton
releases, it uses one of the four output words per call, and its int32 offsets overflow past 2**31
elements. Here one Philox call feeds 4 normals (two Box-Muller pairs) or 128 Rademacher signs, and
counters are 64-bit. Blocks are built as 1-D vectors per Philox output word and interleaved into
element order: a [calls, 4] tile with broadcast words made Triton recompute each call per element
(measured on the H200: 66x the memory floor against 1.4x for this form).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

PI = tl.constexpr(3.141592653589793)  # module globals used in jit code must be constexpr


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
def box_muller(x_a, x_b, FAST: tl.constexpr):
    """Two standard normals: r = sqrt(-2 ln u_a), t = pi * (2 u_b - 1), (r cos t, r sin t).

    FAST (CUDA only) uses the hardware sin/cos approximations (absolute error about 2**-21 on
    (-pi, pi), so |dz| < 4e-6): Box-Muller is compute-bound at H200 bandwidth and the accurate
    versions cost 2x. The log stays accurate: an approximate log2 has an absolute error that becomes
    a large relative error of r for u near 1."""
    u_a = uniform_from_bits(x_a)
    u_b = uniform_from_bits(x_b)
    r = tl.sqrt(-2.0 * tl.log(u_a))
    t = PI * (2.0 * u_b - 1.0)
    if FAST:
        return r * libdevice.fast_cosf(t), r * libdevice.fast_sinf(t)
    else:
        return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def _philox_calls(ctr, seed_lo, seed_hi, key, STREAM: tl.constexpr):
    """Philox words for a 1-D int64 tensor of counters ``ctr`` of tensor ``key`` in stream STREAM."""
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0) + STREAM
    return philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True))


@triton.jit
def gaussian_block(ctr, seed_lo, seed_hi, key, FAST: tl.constexpr):
    """z for the 4 * len(ctr) consecutive elements served by Philox calls ``ctr`` (1-D, consecutive),
    in element order. The 4 normals of a call are computed as 1-D vectors and interleaved (an
    in-register join), which keeps every Philox call and transcendental computed exactly once."""
    x0, x1, x2, x3 = _philox_calls(ctr, seed_lo, seed_hi, key, 0)
    n0, n1 = box_muller(x0, x1, FAST)
    n2, n3 = box_muller(x2, x3, FAST)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def rademacher_block(ctr, seed_lo, seed_hi, key):
    """z for the 128 * len(ctr) consecutive elements served by Philox calls ``ctr``: element lane l of
    a call is bit l % 32 of word l // 32, z = 1 - 2 * bit."""
    x0, x1, x2, x3 = _philox_calls(ctr, seed_lo, seed_hi, key, 1)
    words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))      # word order x0 x1 x2 x3
    bits = (words[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1
    return tl.reshape(1.0 - 2.0 * bits.to(tl.float32), (words.shape[0] * 32,))
