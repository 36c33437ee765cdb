"""The noise stream of docs/noise.md in plain torch: the oracle every backend is tested against, and
the fallback backend where nothing faster runs.

Unsigned 32-bit words are held in int64 tensors (torch has no complete uint32 arithmetic); products
are split into 16-bit halves so nothing overflows. Normals are computed in float64 and rounded to
float32, so this is the most accurate version of the stream; fast backends agree within the
tolerance stated in docs/noise.md. Works on any device torch supports. Slow, but exact.
"""
from __future__ import annotations

import math

import torch

from .noise import (ELEMENTS_PER_CALL, MASK32, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0,
                    PHILOX_W1, ROUNDING_ELEMENTS_PER_CALL, STREAM_STOCHASTIC_ROUNDING, Noise, parse_noise)

# Elements processed per chunk by the oracle backend: bounds its temporaries (a few float64
# vectors of this length) whatever the size of the parameter.
CHUNK = 1 << 20


def _mulhilo32(a: int, b: torch.Tensor):
    """(high word, low word) of the 64-bit product a * b, for a < 2**32 and b holding uint32 values."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo                      # < 2**48
    s = a * b_hi + (p_lo >> 16)          # < 2**49: the product is s * 2**16 + (p_lo & 0xFFFF)
    hi = s >> 16
    lo = ((s & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-R over int64 tensors of uint32 counter words (broadcast together); key is two ints."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *(torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2, c3)))
    k0 &= MASK32
    k1 &= MASK32
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """u = (2 * (x >> 9) + 1) * 2**-24: 23 random bits, u in (0, 1) exactly representable in float32."""
    return ((x >> 9) * 2 + 1).to(torch.float32) * (2.0 ** -24)


def box_muller(x_a: torch.Tensor, x_b: torch.Tensor):
    """Two standard normals from two uint32 words: r = sqrt(-2 ln u_a), t = pi * (2 u_b - 1),
    (r cos t, r sin t). Computed in float64 and rounded to float32."""
    u_a = uniform_from_bits(x_a).double()
    u_b = uniform_from_bits(x_b).double()
    r = torch.sqrt(-2.0 * torch.log(u_a))
    t = math.pi * (2.0 * u_b - 1.0)
    return (r * torch.cos(t)).float(), (r * torch.sin(t)).float()


def _counter_words(index: torch.Tensor, per_call: int):
    ctr = index // per_call
    return ctr & MASK32, ctr >> 32


def raw_bits(index: torch.Tensor, seed: int, key: int, stream: int, per_call: int = 4):
    """The 4 Philox output words for global element indices ``index`` (int64 tensor)."""
    c0, c1 = _counter_words(index, per_call)
    return philox4x32(c0, c1, key & MASK32, stream & MASK32, seed & MASK32, (seed >> 32) & MASK32)


def noise_at(index: torch.Tensor, seed: int, key: int, noise=Noise.GAUSSIAN) -> torch.Tensor:
    """z (float32) at global element indices ``index`` (int64 tensor, any shape) of tensor ``key``."""
    noise = parse_noise(noise)
    per_call = ELEMENTS_PER_CALL[noise]
    x0, x1, x2, x3 = raw_bits(index, seed, key, int(noise), per_call)
    lane = index % per_call
    if noise is Noise.GAUSSIAN:
        n0, n1 = box_muller(x0, x1)
        n2, n3 = box_muller(x2, x3)
        z = torch.where(lane == 0, n0, torch.where(lane == 1, n1, torch.where(lane == 2, n2, n3)))
    else:
        word_index = lane // 32
        word = torch.where(word_index == 0, x0, torch.where(word_index == 1, x1, torch.where(word_index == 2, x2, x3)))
        bit = (word >> (lane % 32)) & 1
        z = (1 - 2 * bit).to(torch.float32)
    return z


def noise(numel: int, seed: int, key: int, noise=Noise.GAUSSIAN, offset: int = 0,
          device=None) -> torch.Tensor:
    """z (float32, shape [numel]) for elements offset .. offset + numel - 1 of tensor ``key``."""
    index = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return noise_at(index, seed, key, noise)


def rounding_bits_at(index: torch.Tensor, round_seed: int, key: int) -> torch.Tensor:
    """The 16-bit stochastic-rounding draws r (int64 in [0, 65536)) of global element indices ``index``
    of tensor ``key`` (docs/noise.md section 8): element i uses Philox call i // 8 of stream 2 keyed by
    round_seed, word (i % 8) // 2, low half for even i and high half for odd i."""
    words = raw_bits(index, round_seed, key, STREAM_STOCHASTIC_ROUNDING, ROUNDING_ELEMENTS_PER_CALL)
    lane = index % ROUNDING_ELEMENTS_PER_CALL
    w = lane // 2
    word = torch.where(w == 0, words[0], torch.where(w == 1, words[1], torch.where(w == 2, words[2], words[3])))
    return (word >> (16 * (lane % 2))) & 0xFFFF


def round_stochastic(y: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 y -> dtype with stochastic rounding by the 16-bit draws r (docs/noise.md section 8).

    lo = y rounded toward zero in dtype, hi = the next dtype value away from zero; with
    q = 2**16 * |y - lo| / |hi - lo| (exact in float32), the result is hi when r + q >= 2**16 (a float32
    sum), else lo. So P(hi) = floor(q + 2**-9) / 2**16: q / 2**16 exactly wherever q is an integer
    (always for bfloat16, for float16 when |y| >= 2**-17), within 2**-16 ulp elsewhere: unbiased. For bfloat16 this
    is exactly "add r to the low 16 bits of y and truncate". Non-finite y and y beyond the largest
    finite value (whose hi is inf) round to nearest / saturate to lo; float32 is returned unchanged.
    """
    if dtype == torch.float32:
        return y.to(dtype)
    y = y.float()
    nearest = y.to(dtype)
    bits = nearest.view(torch.int16).to(torch.int32)
    # Round-to-nearest went away from zero: step its magnitude back by one unit in the last place.
    # (Magnitudes are ordered like their bit patterns, sign bit aside.)
    overshoot = nearest.float().abs() > y.abs()
    lo_bits = torch.where(overshoot, bits - 1, bits)
    hi_bits = lo_bits + 1
    lo = lo_bits.to(torch.int16).view(dtype)
    hi = hi_bits.to(torch.int16).view(dtype)
    lo_f, hi_f = lo.float(), hi.float()
    q = (y - lo_f).abs() / (hi_f - lo_f).abs() * 65536.0
    up = (q + r.to(torch.float32)) >= 65536.0          # NaN q (non-finite y, inf hi) compares False
    return torch.where(up, hi, lo)


def pass_with_z(x: torch.Tensor, a: float, b: float, z: torch.Tensor, r: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain-torch definition of every fused pass, with z given explicitly: a * x + b * z computed
    in float32 and rounded once to ``dtype`` (default x's dtype), to nearest, or stochastically with the
    16-bit draws ``r`` when given. Returns the new value; x is not changed."""
    dtype = x.dtype if dtype is None else dtype
    y = a * x.float() + b * z.float().reshape(x.shape)
    if r is None:
        return y.to(dtype)
    return round_stochastic(y, r.reshape(x.shape), dtype)


def scale_add_noise_(x: torch.Tensor, a: float, b: float, seed: int, key: int, noise_kind=Noise.GAUSSIAN,
           offset: int = 0, load_x: bool = True, round_seed: int | None = None,
           out: torch.Tensor | None = None) -> None:
    """out <- a * x + b * z(seed, key) (b * z with load_x=False), chunk by chunk so temporaries stay
    small. out defaults to x (in place); round_seed turns on stochastic rounding of the stored value."""
    flat = x.view(-1)
    dst = flat if out is None else out.view(-1)
    n = flat.numel()
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        z = noise(stop - start, seed, key, noise_kind, offset + start, device=x.device)
        r = None
        if round_seed is not None and dst.dtype != torch.float32:
            index = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=x.device)
            r = rounding_bits_at(index, round_seed, key)
        src = flat[start:stop] if load_x else torch.zeros_like(z)
        dst[start:stop] = pass_with_z(src, a if load_x else 0.0, b, z, r, dst.dtype)
