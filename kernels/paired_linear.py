"""Paired mode's fused linear layer: both perturbed halves of a doubled batch in one read of W.

    y[:h] = x[:h] @ round(W + eps*z)^T        y[h:] = x[h:] @ round(W - eps*z)^T        (h = M / 2)

z is the noise contract's z of W (docs/noise.md: seed, key, element index n*K + k + offset, Gaussian
stream 0 or Rademacher stream 1), generated in registers; the perturbed weights are never written.
Each rounded tile is what paired mode's materialize path (and exact mode) stores in its copies:
float32 eps*z, float32 sum with W, one round to nearest even to W's dtype (no FMA contraction: the
kernel is compiled without fp fusion, as kernels/axpbz.py is).

Tiling. A program owns one [BLOCK_N] slice of output columns, one [BLOCK_M] block of rows of EACH
half, and one range of K (split-K). Per [BLOCK_N, BLOCK_K] weight tile it loads W once, generates z
once, forms both rounded tiles and multiplies each with its half's [BLOCK_M, BLOCK_K] rows into its
own float32 accumulator (tl.dot). Paired mode's small batches (up to MAX_BLOCK_M rows per half, where
a forward is bound by reading the weights) fit one row block, so every weight element is read once
and its z generated once. Two accumulators of [BLOCK_M, BLOCK_N] float32 bound BLOCK_M by registers,
and shared memory bounds it with the pipeline depth (:func:`_fit_shared`: float32 tiles of 128
columns, which Rademacher noise needs, take fewer stages and a smaller BLOCK_M). Larger batches
take several row blocks, each regenerating z: there the matmul is compute-bound and the caller
keeps the materialize path (fastmezo.paired_linear chooses).

z of a tile: the row n's elements n*K + k0 .. n*K + k0 + BLOCK_K - 1 are consecutive in the stream,
so with K and the offset multiples of 8 (Gaussian, 4 elements per Philox call) or 128 (Rademacher,
128 per call) every row of a tile starts on a call boundary: the tile is BLOCK_N * BLOCK_K / P whole calls, built
as one 1-D vector by kernels.philox's helpers and reshaped to [BLOCK_N, BLOCK_K]. Other shapes or
offsets are refused (:func:`unfusable_reason`); the caller materializes instead.

Parallelism. One row block leaves few programs (N / BLOCK_N) for a GPU of ~130 SMs, so K is split
into SPLIT ranges; each program writes its float32 partial sums to its own slice of a workspace
[SPLIT, M, N], and torch sums the slices in a fixed order. No atomics: results are the same run to
run. With one split (wide layers) the program writes y itself and no workspace is allocated: the
largest layers (an lm_head over a vocabulary) would otherwise hold an [M, N] float32 copy of their
output. The bias (tiny, perturbed by the caller) is added in float32 before the one rounding of y.

Compiled kernels use the fast transcendentals of kernels.philox (FAST); the interpreter (tests on
CPU) uses the accurate ones, rounds bfloat16 on bit patterns (its own conversion truncates) and
multiplies bfloat16 through float32 (its dot reads bfloat16 as integers).
"""
import functools
import os

import torch
import triton
import triton.language as tl

from .axpbz import _as_i32, seed_words
from .philox import gaussian_block, rademacher_block, round_to_nearest

# Read once, as kernels/axpbz.py does: triton reads TRITON_INTERPRET when it is imported.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
_NO_FMA_CONTRACTION = {} if _INTERPRETING else {"enable_fp_fusion": False}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PER_CALL = (4, 128)                     # elements per Philox call: Gaussian, Rademacher
MAX_BLOCK_M = 128                       # rows of each half per program (register budget of 2 accumulators)
STAGES = 3                              # Triton's default software pipeline depth, tried first
# Shared memory assumed where the device cannot be asked (the interpreter): an H100/H200's 227 KiB.
DEFAULT_SHARED = 232448
# Left free for what the estimate does not count (the compiler's own scratch, barriers).
SHARED_MARGIN = 8192


@triton.jit
def _dot(x, w, acc, DTYPE: tl.constexpr, FAST: tl.constexpr):
    """acc + x @ w^T with float32 accumulation. float32 operands: no TF32 (torch's float32 matmul
    default). The interpreter multiplies bfloat16 through float32 (its dot reads bfloat16 as raw
    integers); a bfloat16 product is exact in float32, as in the tensor cores."""
    if DTYPE == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    if DTYPE == tl.bfloat16 and not FAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit(do_not_specialize=["eps", "seed_lo", "seed_hi", "key", "offset", "k_per_split"])
def _paired_linear_kernel(x_ptr, w_ptr, out_ptr, bias_plus_ptr, bias_minus_ptr, M_HALF, N, K, k_per_split, eps,
                          seed_lo, seed_hi, key, offset, NOISE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DIRECT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, FAST: tl.constexpr):
    P: tl.constexpr = 4 if NOISE == 0 else 128
    CALLS_PER_ROW: tl.constexpr = BLOCK_K // P
    DTYPE = w_ptr.dtype.element_ty
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)        # rows of each half
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = rm < M_HALF
    n_ok = rn < N
    # The Philox call of each (row of the tile, call of the row), in the tile's element order.
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
        ctr = (call_row * K + k0 + offset) // P + call_col
        if NOISE == 0:
            z = gaussian_block(ctr, seed_lo, seed_hi, key, FAST)
        else:
            z = rademacher_block(ctr, seed_lo, seed_hi, key, FAST)
        ez = eps * tl.reshape(z, (BLOCK_N, BLOCK_K))
        wf = w.to(tl.float32)
        w_plus = round_to_nearest(wf + ez, DTYPE, FAST)
        w_minus = round_to_nearest(wf - ez, DTYPE, FAST)
        x_mask = m_ok[:, None] & k_ok[None, :]
        x_plus = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
        x_minus = tl.load(x_ptr + (rm + M_HALF)[:, None] * K + kk[None, :], mask=x_mask, other=0.0)
        acc_p = _dot(x_plus, w_plus, acc_p, DTYPE, FAST)
        acc_m = _dot(x_minus, w_minus, acc_m, DTYPE, FAST)
    mask = m_ok[:, None] & n_ok[None, :]
    if DIRECT:      # one split: y itself, the bias added in float32, then the one rounding
        if HAS_BIAS:
            acc_p += tl.load(bias_plus_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_m += tl.load(bias_minus_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rm[:, None] * N + rn[None, :]
        tl.store(out, round_to_nearest(acc_p, DTYPE, FAST), mask=mask)
        tl.store(out + M_HALF * N, round_to_nearest(acc_m, DTYPE, FAST), mask=mask)
    else:           # this split's float32 partial sums
        out = out_ptr + pid_s * (2 * M_HALF * N) + rm[:, None] * N + rn[None, :]
        tl.store(out, acc_p, mask=mask)
        tl.store(out + M_HALF * N, acc_m, mask=mask)


def unfusable_reason(x2d: torch.Tensor, weight: torch.Tensor, noise: int, offset: int) -> str | None:
    """Why :func:`paired_linear` cannot take these operands (None: it can)."""
    if weight.dtype not in DTYPES:
        return f"weight dtype {weight.dtype} (fused: float16, bfloat16, float32)"
    if x2d.dtype != weight.dtype:
        return f"input dtype {x2d.dtype} differs from the weight's {weight.dtype}"
    if weight.dim() != 2 or not weight.is_contiguous():
        return "weight is not a contiguous matrix"
    if x2d.dim() != 2 or x2d.shape[1] != weight.shape[1] or x2d.shape[0] % 2:
        return f"input {tuple(x2d.shape)} is not an even number of rows of {weight.shape[1]} columns"
    if x2d.device != weight.device:
        return "input and weight on different devices"
    align = 8 if noise == 0 else PER_CALL[1]
    if weight.shape[1] % align or offset % align:
        return (f"in-features {weight.shape[1]} or offset {offset} not a multiple of {align}: rows of a "
                "weight tile would not start on a Philox call")
    return None


def shared_bytes(block_m: int, block_n: int, block_k: int, elem: int, stages: int) -> int:
    """Shared memory of one program: the pipelined loads (both halves' x rows and the W tile) in
    ``stages - 1`` buffers, plus the two rounded W tiles staged for tl.dot. This is the layout the
    compiler chose for this kernel (it reproduces the requirement it reported for float32)."""
    return (stages - 1) * (2 * block_m + block_n) * block_k * elem + 2 * block_n * block_k * elem


def _fit_shared(block_m: int, block_n: int, block_k: int, elem: int, limit: int):
    """(block_m, stages): the default pipeline depth, then 2 stages, then halved row blocks (not below
    16, tl.dot's minimum) until the program fits ``limit`` bytes of shared memory."""
    limit -= SHARED_MARGIN
    for stages in (STAGES, 2):
        if shared_bytes(block_m, block_n, block_k, elem, stages) <= limit:
            return block_m, stages
    while block_m > 16 and shared_bytes(block_m, block_n, block_k, elem, 2) > limit:
        block_m //= 2
    return block_m, 2


@functools.lru_cache(maxsize=None)
def _shared_limit(device: torch.device) -> int:
    if device.type != "cuda" or _INTERPRETING:
        return DEFAULT_SHARED
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return int(props["max_shared_mem"])


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_warps(block_m: int) -> int:
    """Warps of a program: 4 up to 64 rows per half, where the two accumulators are small enough for a
    second program to share the SM (docs/perf.md: 4 against 8 warps at 64-row blocks), else 8."""
    return 4 if block_m <= 64 else 8


def _blocks(m_half: int, n: int, k: int, noise: int, device: torch.device, block_n, block_k, split_k,
            elem: int = 2):
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(m_half)))
    block_n = block_n or 64
    block_k = block_k or (64 if noise == 0 else 128)
    if block_k % PER_CALL[noise]:
        raise ValueError(f"block_k {block_k} must be a multiple of {PER_CALL[noise]} (elements per Philox call)")
    block_m, stages = _fit_shared(block_m, block_n, block_k, elem, _shared_limit(device))
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        programs = triton.cdiv(m_half, block_m) * triton.cdiv(n, block_n)
        # About two programs per SM, never splits of less than 4 tiles (each split writes M x N floats).
        sms = _sms(device)
        split_k = max(1, min(triton.cdiv(2 * sms, programs), k_tiles // 4))
    k_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles))) * block_k
    return block_m, block_n, block_k, triton.cdiv(k, k_per_split), k_per_split, stages


def paired_linear(x2d: torch.Tensor, weight: torch.Tensor, eps: float, seed: int, key: int, noise: int = 0,
                  offset: int = 0, bias_plus=None, bias_minus=None, *, block_n: int | None = None,
                  block_k: int | None = None, split_k: int | None = None, num_warps: int | None = None,
                  _direct: bool = True):
    """[M, N] in x2d's dtype: rows :M/2 of x2d times round(W + eps z)^T, rows M/2: times
    round(W - eps z)^T, plus bias_plus / bias_minus (already perturbed, or the same stored bias) added
    in float32 before the one rounding. No autograd; the caller checks :func:`unfusable_reason`.
    With one split the kernel writes y itself (no float32 workspace); ``_direct=False`` (tests) takes
    the workspace path anyway, which must give the same bits."""
    reason = unfusable_reason(x2d, weight, noise, offset)
    if reason is not None:
        raise ValueError(f"paired_linear: {reason}")
    x2d = x2d.contiguous()
    m, k = x2d.shape
    n, h = weight.shape[0], m // 2
    block_m, block_n, block_k, split, k_per_split, stages = _blocks(
        h, n, k, noise, weight.device, block_n, block_k, split_k, weight.element_size())
    direct = split == 1 and _direct
    out = _output(m, n, x2d.dtype, x2d.device) if direct else _workspace(split, m, n, weight.device)
    has_bias = bias_plus is not None
    if m and n:
        grid = (triton.cdiv(h, block_m), triton.cdiv(n, block_n), split)
        _paired_linear_kernel[grid](
            x2d, weight, out, bias_plus if has_bias else weight, bias_minus if has_bias else weight, h, n, k,
            k_per_split, float(eps), *seed_words(seed), _as_i32(key & 0xFFFFFFFF), offset, NOISE=noise,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DIRECT=direct, HAS_BIAS=has_bias, FAST=not _INTERPRETING,
            num_warps=num_warps or default_warps(block_m), num_stages=stages, **_NO_FMA_CONTRACTION)
    return out if direct else summed(out, bias_plus, bias_minus, x2d.dtype)


@triton.jit
def _summed_kernel(part_ptr, y_ptr, bias_plus_ptr, bias_minus_ptr, M_HALF, N, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    total = 2 * M_HALF.to(tl.int64) * N
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT):          # a fixed order: the same y whichever split finished first
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        col = offs % N
        plus = tl.load(bias_plus_ptr + col, mask=mask, other=0.0).to(tl.float32)
        minus = tl.load(bias_minus_ptr + col, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(offs < total // 2, plus, minus)
    tl.store(y_ptr + offs, round_to_nearest(acc, y_ptr.dtype.element_ty, FAST), mask=mask)


SUM_BLOCK = 1024


def summed(workspace: torch.Tensor, bias_plus, bias_minus, dtype) -> torch.Tensor:
    """y from the float32 partial sums of a workspace [splits, M, N]: the splits added in a fixed order,
    each half's bias added in float32, then the one rounding to ``dtype``; one launch, which reads the
    partials once (a split matmul's sum otherwise costs as much as its speed-up on small layers)."""
    splits, m, n = workspace.shape
    y = _output(m, n, dtype, workspace.device)
    if not y.numel():
        return y
    has_bias = bias_plus is not None
    _summed_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
        workspace, y, bias_plus if has_bias else y, bias_minus if has_bias else y, m // 2, n, splits, has_bias,
        SUM_BLOCK, not _INTERPRETING, num_warps=4, **_NO_FMA_CONTRACTION)
    return y


def _output(m: int, n: int, dtype, device) -> torch.Tensor:
    """y of a one-split launch; every element is written by the kernel."""
    return torch.empty((m, n), dtype=dtype, device=device)


def _workspace(split: int, m: int, n: int, device) -> torch.Tensor:
    """The float32 partial sums, one [M, N] slice per split; every element is written by the kernel."""
    return torch.empty((split, m, n), dtype=torch.float32, device=device)
