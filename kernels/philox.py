"""Triton device functions of the noise contract (docs/noise.md, version 1).

Our own Philox4x32-10 rather than ``tl.randn``: tl.randn's counter layout changed between Triton
releases, it uses one of the four output words per call, and its int32 offsets overflow past 2**31
elements. Here one Philox call feeds 4 normals (two Box-Muller pairs) or 128 Rademacher signs, and
counters are 64-bit. Blocks are built as 1-D vectors per Philox output word and interleaved into
element order: a [calls, 4] tile with broadcast words makes Triton recompute each call per element,
many times slower (docs/perf.md).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

PI = tl.constexpr(3.141592653589793)  # module globals used in jit code must be constexpr


# (high, low) words of M * x with one 32x32->64 multiply (compiled CUDA only): umulhi and mul
# separately cost two multiplies, and Philox is most of the pass's instructions.
@triton.jit
def _mulhilo_m0(x):
    return tl.inline_asm_elementwise(
        asm="{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$1, $0}, t; }",
        constraints="=r,=r,r", args=[x], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def _mulhilo_m1(x):
    return tl.inline_asm_elementwise(
        asm="{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$1, $0}, t; }",
        constraints="=r,=r,r", args=[x], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1, WIDE: tl.constexpr = False):
    """Philox4x32-10 (Random123) on uint32 tensors; returns the 4 output words. WIDE (compiled CUDA
    kernels only) uses one wide multiply per product instead of umulhi + mul."""
    M0: tl.constexpr = 0xD2511F53
    M1: tl.constexpr = 0xCD9E8D57
    W0: tl.constexpr = 0x9E3779B9
    W1: tl.constexpr = 0xBB67AE85
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        if WIDE:
            hi1, lo1 = _mulhilo_m1(_c2)
            hi0, lo0 = _mulhilo_m0(_c0)
        else:
            hi1 = tl.umulhi(M1, _c2)
            hi0 = tl.umulhi(M0, _c0)
            lo1 = tl.mul(M1, _c2, sanitize_overflow=False)
            lo0 = tl.mul(M0, _c0, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c2 = hi0 ^ c3 ^ k1
        c1 = lo1
        c3 = lo0
        k0 = tl.add(k0, W0, sanitize_overflow=False)
        k1 = tl.add(k1, W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def uniform_from_bits(x):
    """(2 * (x >> 9) + 1) * 2**-24: a float32 in (0, 1), exact, identical on every backend.

    Built on the bits rather than by an integer-to-float conversion: 1 + (x >> 9) * 2**-23 is the
    float32 whose mantissa is x >> 9, and subtracting 1 - 2**-24 from it is exact (the result has at
    most 24 significant bits). A conversion runs on the GPU's quarter-rate conversion unit, which the
    Gaussian pass already loads with its log, sqrt, sin and cos."""
    one_plus = ((x >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    return one_plus - 0.99999994039535522


@triton.jit
def _minus_2_log(u, FAST: tl.constexpr):
    """-2 ln u for the uniforms of uniform_from_bits (u in [2**-24, 1 - 2**-24]).

    FAST (CUDA only): the hardware log2 (lg2.approx, absolute error about 2**-22) where u <= 1 - 2**-10,
    so r = sqrt(-2 ln u) >= 0.044 and the absolute error of r stays below 3e-6; nearer to 1, where
    that absolute error would be a large relative error of a small r, the series
    -2 ln(1 - d) = 2 d (1 + d / 2 + d**2 / 3) in the exact d = 1 - u (truncation below 2**-32
    relative). libdevice's accurate logf costs ~2x the instructions, and the pass is compute-bound."""
    if FAST:
        d = 1.0 - u
        series = 2.0 * d * (1.0 + d * (0.5 + d * 0.3333333333333333))
        return tl.where(d < 0.0009765625, series, -1.3862943611198906 * libdevice.fast_log2f(u))
    else:
        return -2.0 * tl.log(u)


@triton.jit
def box_muller(x_a, x_b, FAST: tl.constexpr):
    """Two standard normals: r = sqrt(-2 ln u_a), t = pi * (2 u_b - 1), (r cos t, r sin t).

    FAST (CUDA only) uses the hardware sin/cos approximations (absolute error about 2**-21 on
    (-pi, pi), so |dz| < 4e-6) and the hardware log2 away from u_a = 1 (_minus_2_log): Box-Muller is
    compute-bound at HBM bandwidth, where the accurate versions are markedly slower (docs/perf.md)."""
    u_a = uniform_from_bits(x_a)
    u_b = uniform_from_bits(x_b)
    r = tl.sqrt(_minus_2_log(u_a, FAST))
    t = PI * (2.0 * u_b - 1.0)
    if FAST:
        return r * libdevice.fast_cosf(t), r * libdevice.fast_sinf(t)
    else:
        return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def _philox_calls(ctr, seed_lo, seed_hi, key, STREAM: tl.constexpr, WIDE: tl.constexpr = False):
    """Philox words for a 1-D int64 tensor of counters ``ctr`` of tensor ``key`` in stream STREAM."""
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0) + STREAM
    return philox4x32_10(c0, c1, c2, c3, seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True),
                         WIDE)


@triton.jit
def gaussian_block(ctr, seed_lo, seed_hi, key, FAST: tl.constexpr):
    """z for the 4 * len(ctr) consecutive elements served by Philox calls ``ctr`` (1-D, consecutive),
    in element order. The 4 normals of a call are computed as 1-D vectors and interleaved (an
    in-register join), which keeps every Philox call and transcendental computed exactly once."""
    x0, x1, x2, x3 = _philox_calls(ctr, seed_lo, seed_hi, key, 0, FAST)
    n0, n1 = box_muller(x0, x1, FAST)
    n2, n3 = box_muller(x2, x3, FAST)
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def tile8(v0, v1, v2, v3, v4, v5, v6, v7):
    """The [R, 8] tile whose row i is (v0[i], ..., v7[i]), for eight 1-D tensors of length R.

    Built by joins, which add a dimension held within each thread, so a thread that computed a row's
    eight values stores them as one vector with no data movement. (Interleaving 1-D vectors instead makes
    the compiler exchange values between threads through shared memory, with barriers, on every chunk.)
    The join nesting puts v_l at column l = 4i + 2j + k of the [R, 2, 2, 2] result: the innermost join
    picks i, the outermost k."""
    return tl.reshape(tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7))),
                      (v0.shape[0], 8))


@triton.jit
def gaussian_rows(row, seed_lo, seed_hi, key, FAST: tl.constexpr):
    """z of the elements of rows ``row`` (1-D int64) as an [R, 8] tile: row i holds elements
    8 row_i .. 8 row_i + 7, the normals of Philox calls 2 row_i and 2 row_i + 1 in element order (the
    same values as gaussian_block, laid out for 8-element vector accesses)."""
    e0, e1, e2, e3 = _philox_calls(2 * row, seed_lo, seed_hi, key, 0, FAST)
    o0, o1, o2, o3 = _philox_calls(2 * row + 1, seed_lo, seed_hi, key, 0, FAST)
    n0, n1 = box_muller(e0, e1, FAST)
    n2, n3 = box_muller(e2, e3, FAST)
    n4, n5 = box_muller(o0, o1, FAST)
    n6, n7 = box_muller(o2, o3, FAST)
    return tile8(n0, n1, n2, n3, n4, n5, n6, n7)


@triton.jit
def rounding_rows(row, seed_lo, seed_hi, key, FAST: tl.constexpr = False):
    """The stochastic-rounding draws of rows ``row`` as an [R, 8] tile (row i: elements 8 row_i ..
    8 row_i + 7, rounding-stream call row_i; the values of rounding_draws)."""
    w0, w1, w2, w3 = _philox_calls(row, seed_lo, seed_hi, key, 2, FAST)
    return tile8(w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16, w3 & 0xFFFF, w3 >> 16)


@triton.jit
def rademacher_block(ctr, seed_lo, seed_hi, key, FAST: tl.constexpr = False):
    """z for the 128 * len(ctr) consecutive elements served by Philox calls ``ctr``: element lane l of
    a call is bit l % 32 of word l // 32, z = 1 - 2 * bit."""
    x0, x1, x2, x3 = _philox_calls(ctr, seed_lo, seed_hi, key, 1, FAST)
    words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))      # word order x0 x1 x2 x3
    bits = (words[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1
    return tl.reshape(1.0 - 2.0 * bits.to(tl.float32), (words.shape[0] * 32,))


@triton.jit
def rounding_draws(first_call, CALLS: tl.constexpr, seed_lo, seed_hi, key, FAST: tl.constexpr = False):
    """The 16-bit stochastic-rounding draws (uint32 holding 0..65535) of the 8 * CALLS consecutive
    elements served by rounding-stream calls first_call .. first_call + CALLS - 1, in element order
    (docs/noise.md section 8: element i uses the low half, then the high half, of word (i % 8) // 2)."""
    ctr = first_call + tl.arange(0, CALLS).to(tl.int64)
    x0, x1, x2, x3 = _philox_calls(ctr, seed_lo, seed_hi, key, 2, FAST)
    words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))      # word order x0 x1 x2 x3
    return tl.interleave(words & 0xFFFF, words >> 16)


@triton.jit
def round_to_nearest(y, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """float32 -> DTYPE, to nearest even: the hardware conversion when compiled (FAST). Triton's
    interpreter converts float32 to bfloat16 by truncation (and flushes subnormals), so there the
    bfloat16 pattern is made from the float32 one: add 0x7FFF plus the kept lowest bit, keep the high
    half (which carries into the exponent as rounding up should, to infinity past the largest value)."""
    if DTYPE == tl.bfloat16 and not FAST:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y == y, rounded, (bits >> 16) | 0x40)          # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(DTYPE)


@triton.jit
def round_stochastic(y, r, DTYPE: tl.constexpr, FAST: tl.constexpr = False):
    """float32 y -> DTYPE (float16 or bfloat16) rounded stochastically by the 16-bit draws r (uint32),
    bit-identical to fastmezo.oracle.round_stochastic (docs/noise.md section 8): lo = y toward zero,
    hi = the next value away from zero, q = 2**16 |y - lo| / |hi - lo|, hi if the float32 sum q + r
    is >= 2**16.

    On bit patterns, the stored pattern built directly, with no integer/float conversion: conversions run
    on the GPU's quarter-rate conversion unit, which the Gaussian pass already keeps busy.
      * bfloat16: lo is y's pattern truncated to 16 bits and q its low 16 bits: "add r, truncate".
      * float16, normal range (|y| >= 2**-14): 13 mantissa bits are dropped and q = those bits * 8, an
        integer, so q + r >= 2**16 iff those bits + (r >> 3) carry into bit 13; the float16 pattern is
        the float32 pattern shifted by 13 with the exponent re-biased by 112.
      * float16 subnormals (|y| < 2**-14, gap 2**-24): _float16_subnormal.
    y beyond the largest finite value saturates to it; infinities stay, NaN becomes a quiet NaN."""
    ybits = y.to(tl.uint32, bitcast=True)
    mag = ybits & 0x7FFFFFFF
    sign16 = (ybits >> 16) & 0x8000
    finite = mag < 0x7F800000
    nan = mag > 0x7F800000
    if DTYPE == tl.bfloat16:
        rounded = tl.minimum((mag + r) >> 16, 0x7F7F)   # carries into the exponent; inf saturates instead
        bits = tl.where(finite, rounded, tl.where(nan, 0x7FC0, 0x7F80)) | sign16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        normal = tl.minimum(((mag + (r >> 3)) >> 13) - (112 << 10), 0x7BFF)
        bits = tl.where(mag < 0x38800000, _float16_subnormal(mag, r, FAST), normal)
        bits = tl.where(finite, bits, tl.where(nan, 0x7E00, 0x7C00)) | sign16
        return bits.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _float16_subnormal(mag, r, FAST: tl.constexpr):
    """The float16 pattern of |y| < 2**-14 (pattern ``mag``, gap 2**-24) rounded stochastically by r.

    The contract's decision, hi iff the float32 sum q + r >= 2**16, holds iff q + r + 2**-9 >= 2**16 in
    exact arithmetic (below 2**16 float32 steps by 2**-8 and the tie rounds to the even 2**16). With
    t = |y| 2**24 = floor(t) + q 2**-16, the result is therefore floor(V / 2**16), V = 2**16 t + 2**-9 + r.

    FAST (compiled): V's floor in three float32 operations rounding toward zero, which can never cross
    the multiple of 2**16 below V (it is representable and rounding toward zero is monotone):
    W = rz(2**40 |y| + 2**-9) (one fma, the product exact), X = rz(W + 2**23 + r) (2**23 + r is the
    float whose bits are r | 0x4B000000; it adds 128 units), M = rz(X + 2**39) (float32 steps by 2**16
    there, so M - 2**39 is X truncated to units); the pattern is bits(M) - bits(2**39) - 128.
    Otherwise (interpreter: no directed rounding): t, its floor and q exactly in float32 and the
    contract's sum itself, with r and floor(t) moved between integer and float through the bits of
    2**23 + k (exact below 2**23). Both forms are checked against the oracle (tests/test_rounding.py)."""
    if FAST:
        w = libdevice.fma_rz(mag.to(tl.float32, bitcast=True), 1099511627776.0, 0.001953125)
        x = libdevice.add_rz(w, (r | 0x4B000000).to(tl.float32, bitcast=True))
        m = libdevice.add_rz(x, 549755813888.0)
        return m.to(tl.uint32, bitcast=True) - (0x53000000 + 128)
    else:
        t = mag.to(tl.float32, bitcast=True) * 16777216.0
        fl = tl.floor(t)
        q = (t - fl) * 65536.0
        r_f = (r | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        up = ((q + r_f) >= 65536.0).to(tl.uint32)
        return (fl + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000 + up
