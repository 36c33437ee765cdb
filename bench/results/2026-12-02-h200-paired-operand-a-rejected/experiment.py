"""Experiment: the fused paired linear with the perturbed weight as the MMA's A operand (acc^T = W' x^T),
so that wgmma may read it from registers; against the production kernel, cuBLAS and a pair pass + bmm."""
import os, sys, statistics
sys.path.insert(0, ".")
import torch, triton, triton.language as tl
from fastmezo.kernels.paired_linear import paired_linear, _INTERPRETING, _NO_FMA_CONTRACTION, _i32
from fastmezo.kernels.philox import gaussian_block, round_to_nearest


@triton.jit(do_not_specialize=["eps", "seed_lo", "seed_hi", "key", "offset", "k_per_split"])
def _kt(x_ptr, w_ptr, out_ptr, M_HALF, N, K, k_per_split, eps, seed_lo, seed_hi, key, offset,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr):
    P: tl.constexpr = 4
    CALLS_PER_ROW: tl.constexpr = BLOCK_K // P
    DTYPE = w_ptr.dtype.element_ty
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rm = tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = rm < M_HALF
    n_ok = rn < N
    j = tl.arange(0, BLOCK_N * CALLS_PER_ROW).to(tl.int64)
    call_row = pid_n * BLOCK_N + j // CALLS_PER_ROW
    call_col = j % CALLS_PER_ROW
    acc_p = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None], other=0.0)
        ctr = (call_row * K + k0 + offset) // P + call_col
        z = gaussian_block(ctr, seed_lo, seed_hi, key, FAST)
        ez = eps * tl.reshape(z, (BLOCK_N, BLOCK_K))
        wf = w.to(tl.float32)
        w_plus = round_to_nearest(wf + ez, DTYPE, FAST)
        w_minus = round_to_nearest(wf - ez, DTYPE, FAST)
        xt_p = tl.load(x_ptr + rm[None, :] * K + kk[:, None], mask=m_ok[None, :], other=0.0)
        xt_m = tl.load(x_ptr + (rm + M_HALF)[None, :] * K + kk[:, None], mask=m_ok[None, :], other=0.0)
        acc_p = tl.dot(w_plus, xt_p, acc_p)
        acc_m = tl.dot(w_minus, xt_m, acc_m)
    mask = n_ok[:, None] & m_ok[None, :]
    out = out_ptr + pid_s * (2 * M_HALF * N) + rm[None, :] * N + rn[:, None]
    tl.store(out, acc_p, mask=mask)
    tl.store(out + M_HALF * N, acc_m, mask=mask)


def fused_t(x, w, eps, seed, key, block_n=64, block_k=64, split=1, warps=4, stages=3):
    m, k = x.shape
    n, h = w.shape[0], m // 2
    bm = max(16, triton.next_power_of_2(h))
    kps = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    split = triton.cdiv(k, kps)
    out = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _kt[(triton.cdiv(n, block_n), split)](x, w, out, h, n, k, kps, float(eps), _i32(seed & 0xFFFFFFFF),
                                          _i32(seed >> 32), _i32(key), 0, BLOCK_M=bm, BLOCK_N=block_n,
                                          BLOCK_K=block_k, FAST=not _INTERPRETING, num_warps=warps,
                                          num_stages=stages, **_NO_FMA_CONTRACTION)
    return (out[0] if split == 1 else out.sum(0)).to(x.dtype)


def q(fn, inner=20, rounds=5):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner): fn()
        e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / inner)
    return statistics.median(ts)


if __name__ == "__main__":
    dev = "cpu" if _INTERPRETING else "cuda"
    shapes = {"tiny": (64, 128)} if dev == "cpu" else {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480)}
    half = 8 if dev == "cpu" else 128
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        x = torch.randn(2 * half, k, device=dev, dtype=torch.float16)
        ref = paired_linear(x, w, 1e-3, 7, 3)
        if dev == "cpu":
            y = fused_t(x, w, 1e-3, 7, 3, block_n=32, block_k=32, split=2)
            print(name, "max |diff|", (y.float() - ref.float()).abs().max().item(), "ref scale", ref.float().abs().max().item())
            continue
        w2 = torch.empty(2, n, k, device=dev, dtype=torch.float16)
        print(f"{name}: production {q(lambda: paired_linear(x, w, 1e-3, 7, 3)):.4f} ms, "
              f"cuBLAS bmm on copies {q(lambda: torch.bmm(x.view(2, half, k), w2.transpose(1, 2))):.4f} ms")
        for bn, bk, warps, stages in ((64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4),
                                      (128, 64, 4, 3), (64, 128, 4, 2)):
            for split in (1, 2, 4):
                try:
                    y = fused_t(x, w, 1e-3, 7, 3, bn, bk, split, warps, stages)
                    d = (y.float() - ref.float()).abs().max().item()
                    t = q(lambda: fused_t(x, w, 1e-3, 7, 3, bn, bk, split, warps, stages))
                    print(f"   bn {bn:3d} bk {bk:3d} warps {warps} stages {stages} split {split}: {t:.4f} ms  diff {d:.2g}")
                except Exception as e:
                    print(f"   bn {bn} bk {bk} warps {warps} stages {stages} split {split}: {type(e).__name__} {str(e)[:100]}")

