"""Where the time of paired mode's fused matmul goes: variants of the kernel that leave one stage out,
and launch shapes the library does not choose, timed beside the production kernel and cuBLAS.

    python -m bench.paired_anatomy [--rows 128] [--out DIR]
    ncu --clock-control none -k regex:_variant --section WarpStateStats ... \
        python -m bench.paired_anatomy --only full:q_proj

Variants (MODE) of kernels/paired_linear.py's program, same tiling and split-K as the library's:
full = the production program; no-noise = eps * W instead of eps * z (no Philox, no interleave of the
noise into the tile); no-dot = the rounded tiles summed into the accumulators instead of multiplied (no
tensor-core work, no staging of the tiles in shared memory); no-convert = z made and kept alive but not
laid out as the tile (eps * W used). The differences say what each stage costs: a lab measurement, the
variants' outputs are not the library's.
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from kernels.paired_linear import (_INTERPRETING, _NO_FMA_CONTRACTION, _blocks, _dot, _sms, default_warps,
                                   paired_linear)
from kernels.philox import gaussian_block, gaussian_rows, round_to_nearest

from .sweep_pass import queued_ms

MODES = {"full": 0, "no-noise": 1, "no-dot": 2, "no-convert": 3}
SHAPES = {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480)}


@triton.jit(do_not_specialize=["eps", "seed_lo", "seed_hi", "key", "k_per_split"])
def _variant(x_ptr, w_ptr, ws_ptr, M_HALF, N, K, k_per_split, eps, seed_lo, seed_hi, key, MODE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr):
    CALLS_PER_ROW: tl.constexpr = BLOCK_K // 4
    DTYPE = w_ptr.dtype.element_ty
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = rm < M_HALF
    n_ok = rn < N
    j = tl.arange(0, BLOCK_N * CALLS_PER_ROW).to(tl.int64)
    call_row = pid_n * BLOCK_N + j // CALLS_PER_ROW
    call_col = j % CALLS_PER_ROW
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        w = tl.load(w_ptr + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        wf = w.to(tl.float32)
        if MODE == 1:
            ez = eps * wf
        elif MODE == 3:
            z = gaussian_block((call_row * K + k0) // 4 + call_col, seed_lo, seed_hi, key, FAST)
            ez = eps * wf + tl.sum(z) * 1e-30
        else:
            z = gaussian_block((call_row * K + k0) // 4 + call_col, seed_lo, seed_hi, key, FAST)
            ez = eps * tl.reshape(z, (BLOCK_N, BLOCK_K))
        w_plus = round_to_nearest(wf + ez, DTYPE, FAST)
        w_minus = round_to_nearest(wf - ez, DTYPE, FAST)
        x_mask = m_ok[:, None] & k_ok[None, :]
        x_plus = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
        x_minus = tl.load(x_ptr + (rm + M_HALF)[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
        if MODE == 2:
            acc_p += tl.sum(w_plus.to(tl.float32), axis=1)[None, :] + tl.sum(x_plus.to(tl.float32), axis=1)[:, None]
            acc_m += tl.sum(w_minus.to(tl.float32), axis=1)[None, :] + tl.sum(x_minus.to(tl.float32), axis=1)[:, None]
        else:
            acc_p = _dot(x_plus, w_plus, acc_p, DTYPE, FAST)
            acc_m = _dot(x_minus, w_minus, acc_m, DTYPE, FAST)
    out = ws_ptr + pid_s * (2 * M_HALF * N) + rm[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    tl.store(out, acc_p, mask=mask)
    tl.store(out + M_HALF * N, acc_m, mask=mask)


@triton.jit(do_not_specialize=["eps", "seed_lo", "seed_hi", "key", "k_per_split"])
def _two_phase(x_ptr, w_ptr, ws_ptr, scratch_ptr, M_HALF, N, K, k_per_split, eps, seed_lo, seed_hi, key,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLAB: tl.constexpr,
               ROWS: tl.constexpr, FAST: tl.constexpr):
    """Per slab of SLAB columns: (A) round(W +- eps z) of the program's [BLOCK_N, SLAB] slab written to its
    own scratch (L2-resident), in the pass kernel's [rows, 8] layout; (B) a plain tl.dot loop over the
    scratch, whose operands come straight from loads (the pipeline the compiler builds for a GEMM)."""
    DTYPE = w_ptr.dtype.element_ty
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    prog = (pid_s * tl.num_programs(1) + pid_n) * tl.num_programs(0) + pid_m
    plus_ptr = scratch_ptr + prog * (2 * BLOCK_N * SLAB)
    minus_ptr = plus_ptr + BLOCK_N * SLAB
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    tn = tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = rm < M_HALF
    ROW_CHUNKS: tl.constexpr = SLAB // 8
    acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for s0 in range(k_lo, k_hi, SLAB):
        # (A): rows of 8 elements; row r of the slab is weight row r // ROW_CHUNKS, columns 8 (r % ROW_CHUNKS).
        for r0 in range(0, BLOCK_N * ROW_CHUNKS, ROWS):
            r = r0 + tl.arange(0, ROWS).to(tl.int64)
            n = pid_n * BLOCK_N + r // ROW_CHUNKS
            col = (r % ROW_CHUNKS) * 8
            lane = tl.arange(0, 8).to(tl.int64)
            ok = (n < N)[:, None] & ((s0 + col)[:, None] + lane[None, :] < k_hi)
            w = tl.load(w_ptr + (n * K + s0 + col)[:, None] + lane[None, :], mask=ok, other=0.0).to(tl.float32)
            ez = eps * gaussian_rows((n * K + s0 + col) // 8, seed_lo, seed_hi, key, FAST)
            at = ((r // ROW_CHUNKS) * SLAB + col)[:, None] + lane[None, :]
            tl.store(plus_ptr + at, round_to_nearest(w + ez, DTYPE, FAST))
            tl.store(minus_ptr + at, round_to_nearest(w - ez, DTYPE, FAST))
        tl.debug_barrier()
        # (B)
        for k0 in range(0, SLAB, BLOCK_K):
            kk = s0 + k0 + rk
            k_ok = kk < k_hi
            x_mask = m_ok[:, None] & k_ok[None, :]
            x_plus = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
            x_minus = tl.load(x_ptr + (rm + M_HALF)[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
            at = tn[:, None] * SLAB + (k0 + rk)[None, :]
            w_plus = tl.load(plus_ptr + at, mask=k_ok[None, :], other=0.0)
            w_minus = tl.load(minus_ptr + at, mask=k_ok[None, :], other=0.0)
            acc_p = _dot(x_plus, w_plus, acc_p, DTYPE, FAST)
            acc_m = _dot(x_minus, w_minus, acc_m, DTYPE, FAST)
        tl.debug_barrier()
    out = ws_ptr + pid_s * (2 * M_HALF * N) + rm[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & (rn < N)[None, :]
    tl.store(out, acc_p, mask=mask)
    tl.store(out + M_HALF * N, acc_m, mask=mask)


def run_two_phase(x, w, ws, block_m, block_n, block_k, split, warps, stages, slab, rows=128):
    m_half, (n, k) = x.shape[0] // 2, w.shape
    k_per_split = triton.cdiv(triton.cdiv(k, slab), split) * slab
    grid = (triton.cdiv(m_half, block_m), triton.cdiv(n, block_n), triton.cdiv(k, k_per_split))
    scratch = _scratch(grid[0] * grid[1] * grid[2] * 2 * block_n * slab, w)
    _two_phase[grid](x, w, ws, scratch, m_half, n, k, k_per_split, 1e-3, 7, 0, 3, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=block_k, SLAB=slab, ROWS=rows, FAST=not _INTERPRETING, num_warps=warps,
                     num_stages=stages, **_NO_FMA_CONTRACTION)
    return ws[0] if grid[2] == 1 else ws[:grid[2]].sum(0)


_scratches = {}


def _scratch(numel, like):
    key = (numel, like.dtype, like.device)
    if key not in _scratches:
        _scratches[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return _scratches[key]


def run_variant(x, w, ws, mode: str, block_m: int, block_n: int, block_k: int, split: int, warps: int,
                stages: int, maxnreg: int | None):
    if mode == "two-phase":           # maxnreg carries the slab
        return run_two_phase(x, w, ws, block_m, block_n, block_k, split, warps, stages, maxnreg)
    m_half, (n, k) = x.shape[0] // 2, w.shape
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    grid = (triton.cdiv(m_half, block_m), triton.cdiv(n, block_n), triton.cdiv(k, k_per_split))
    extra = dict(_NO_FMA_CONTRACTION, **({"maxnreg": maxnreg} if maxnreg else {}))
    _variant[grid](x, w, ws, m_half, n, k, k_per_split, 1e-3, 7, 0, 3, MODE=MODES[mode], BLOCK_M=block_m,
                   BLOCK_N=block_n, BLOCK_K=block_k, FAST=not _INTERPRETING, num_warps=warps, num_stages=stages,
                   **extra)


def configs(m_half: int, n: int, k: int, device):
    """(label, mode, block_m, block_n, block_k, split, warps, stages, maxnreg): the library's shape for every
    mode, then launch shapes it does not take (fewer stages, a register cap, smaller row blocks)."""
    bm, bn, bk, split, _, stages = _blocks(m_half, n, k, 0, device, None, None, None)
    warps = default_warps(bm)
    for mode in MODES:
        yield mode, mode, bm, bn, bk, split, warps, stages, None
    yield "full 2 stages", "full", bm, bn, bk, split, warps, 2, None
    yield "full 2 stages maxnreg 128", "full", bm, bn, bk, split, warps, 2, 128
    yield "full block_m 64 4 warps", "full", 64, bn, bk, split, 4, stages, None
    yield "full block_m 64 4 warps 2 stages", "full", 64, bn, bk, split, 4, 2, None
    yield "full block_m 64 8 warps", "full", 64, bn, bk, split, 8, stages, None
    # 64-row blocks with the library's split rule (about two programs per SM) applied to their count.
    bm64 = min(bm, 64)
    programs = triton.cdiv(m_half, bm64) * triton.cdiv(n, bn)
    split64 = max(1, min(triton.cdiv(2 * _sms(device), programs), triton.cdiv(k, bk) // 4))
    yield "full block_m 64 4 warps, its own split", "full", bm64, bn, bk, split64, 4, stages, None
    yield "full block_m 64 4 warps 2 stages, its own split", "full", bm64, bn, bk, split64, 4, 2, None
    for slab in (256, 512):
        for two_bn, two_split in ((bn, split), (128, split), (bn, max(1, split // 2))):
            yield (f"two-phase slab {slab} block_n {two_bn} split {two_split}", "two-phase", bm, two_bn, bk, two_split,
                   warps, stages, slab)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128, help="rows of each half (batch x sequence)")
    p.add_argument("--layers", default="q_proj,fc1")
    p.add_argument("--only", default=None, help="'label:layer': one launch of that config, for ncu")
    p.add_argument("--configs", default=None, help="';'-separated labels of the configs to time (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    rows = []
    for layer in args.layers.split(","):
        n, k = SHAPES[layer]
        w = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        x = torch.randn(2 * args.rows, k, device=dev, dtype=torch.float16)
        ws = torch.empty((64, 2 * args.rows, n), device=dev, dtype=torch.float32)
        if args.only:
            label, only_layer = args.only.rsplit(":", 1)
            if only_layer == layer:
                cfg = next(c for c in configs(args.rows, n, k, dev) if c[0] == label)
                run_variant(x, w, ws, *cfg[1:])
                torch.cuda.synchronize()
            continue
        prod = queued_ms(lambda: paired_linear(x, w, 1e-3, 7, 3))
        mm = queued_ms(lambda: torch.mm(x, w.t()))
        noise = queued_ms(lambda: torch.empty_like(w).normal_())
        rows += [{"layer": layer, "rows": args.rows, "config": "production paired_linear", "ms": prod},
                 {"layer": layer, "rows": args.rows, "config": "torch.mm (2 halves, one W)", "ms": mm},
                 {"layer": layer, "rows": args.rows, "config": "torch normal_ of W's size", "ms": noise}]
        for cfg in configs(args.rows, n, k, dev):
            if args.configs and cfg[0] not in args.configs.split(";"):
                continue
            try:
                ms = queued_ms(lambda: run_variant(x, w, ws, *cfg[1:]))
            except Exception as exc:                 # noqa: BLE001 - a launch shape that does not compile
                ms, cfg = float("nan"), (f"{cfg[0]} ({type(exc).__name__}: {str(exc)[:60]})",) + cfg[1:]
            rows.append({"layer": layer, "rows": args.rows, "config": cfg[0], "ms": ms, "block": cfg[2:]})
    for r in rows:
        print(f"{r['layer']:7} {r['config']:60} {r['ms']:8.4f} ms")
    if args.out:
        with open(f"{args.out}/paired_anatomy.json", "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "rows_per_half": args.rows, "rows": rows}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
