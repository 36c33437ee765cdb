"""Scratch: time kernel layout variants of the fused pass on the GPU (noise-exactness checked)."""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastmezo.kernels.philox import philox4x32_10, uniform_from_bits
from fastmezo import reference as R

PI = tl.constexpr(3.141592653589793)


@triton.jit
def _bm(xa, xb, FAST: tl.constexpr):
    ua = uniform_from_bits(xa)
    ub = uniform_from_bits(xb)
    t = PI * (2.0 * ub - 1.0)
    if FAST:
        r = tl.sqrt(-1.3862943611198906 * libdevice.fast_log2f(ua))
        return r * libdevice.fast_cosf(t), r * libdevice.fast_sinf(t)
    else:
        r = tl.sqrt(-2.0 * tl.log(ua))
        return r * tl.cos(t), r * tl.sin(t)


@triton.jit
def g_1d(x_ptr, n, a, b, k0, k1, key, ROWS: tl.constexpr, FAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ctr = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True))
    n0, n1 = _bm(x0, x1, FAST)
    n2, n3 = _bm(x2, x3, FAST)
    z = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
    offs = pid * (4 * ROWS) + tl.arange(0, 4 * ROWS).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, (a * x + b * z).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def r_words(x_ptr, n, a, b, k0, k1, key, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    ctr = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + key.to(tl.uint32, bitcast=True)
    c3 = tl.zeros_like(c0) + 1
    x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True))
    w = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))        # [4R] words in order
    bits = (w[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1      # [4R, 32]
    z = tl.reshape(1.0 - 2.0 * bits.to(tl.float32), (128 * ROWS,))
    offs = pid * (128 * ROWS) + tl.arange(0, 128 * ROWS).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + offs, (a * x + b * z).to(x_ptr.dtype.element_ty), mask=mask)


def bench(fn, reps=20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def main():
    from fastmezo import functional as F
    n = 1 << 29
    x = torch.randn(n, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    floor = bench(lambda: y.copy_(x))
    rows = [("copy", floor)]
    seed, key = 0x1234567890ABCDEF, 5
    lo, hi = seed & 0xFFFFFFFF, seed >> 32
    to32 = lambda v: v - (1 << 32) if v >= (1 << 31) else v
    m = 1 << 20
    for fast in (False, True):
        for R_ in (256, 512, 1024):
            for warps in (4, 8):
                grid = (triton.cdiv(n, 4 * R_),)
                t = bench(lambda: g_1d[grid](x, n, 1.0, 1e-3, to32(lo), to32(hi), key, ROWS=R_, FAST=fast, num_warps=warps))
                z = torch.zeros(m, device="cuda")
                g_1d[(triton.cdiv(m, 4 * R_),)](z, m, 0.0, 1.0, to32(lo), to32(hi), key, ROWS=R_, FAST=fast, num_warps=warps)
                zr = R.noise(m, seed, key, "gaussian", device="cuda")
                err = ((z - zr).abs() / (1 + zr.abs())).max().item()
                rows.append((f"gauss1d fast={fast} rows={R_} w={warps} err={err:.1e}", t))
    for R_ in (8, 16, 32, 64):
        for warps in (4, 8):
            grid = (triton.cdiv(n, 128 * R_),)
            t = bench(lambda: r_words[grid](x, n, 1.0, 1e-3, to32(lo), to32(hi), key, ROWS=R_, num_warps=warps))
            z = torch.zeros(m, device="cuda")
            r_words[(triton.cdiv(m, 128 * R_),)](z, m, 0.0, 1.0, to32(lo), to32(hi), key, ROWS=R_, num_warps=warps)
            zr = R.noise(m, seed, key, "rademacher", device="cuda")
            rows.append((f"rad words rows={R_} w={warps} exact={torch.equal(z, zr)}", t))
    rows.append(("current gaussian", bench(lambda: F.perturb_([x], 1, 1e-3))))
    rows.append(("current rademacher", bench(lambda: F.perturb_([x], 1, 1e-3, noise="rademacher"))))
    for name, t in rows:
        print(f"{name:55s} {t:8.3f} ms {t / floor:6.2f}x floor")


if __name__ == "__main__":
    main()
