"""Paired mode's fused linear layer on Hopper, warp-specialized (Gluon): the same product as
kernels/paired_linear.py,

    y[:h] = x[:h] @ round(W + eps*z)^T        y[h:] = x[h:] @ round(W - eps*z)^T        (h = M / 2)

with z the noise contract's Gaussian z of W (element n*K + k + offset, stream 0), but with the noise
made by warps of their own beside the tensor-core warps, so that generating z (the bound at small
batches) overlaps the matmul instead of alternating with it.

A program owns BLOCK_N output columns and BLOCK_M rows of each half (and, split-K, a range of K), and
walks K in BLOCK_K steps through rings of shared-memory slots. Its partitions:

* a W loader warp: copies each [BLOCK_N, BLOCK_K] tile of W into a ring of W_STAGES slots with TMA
  (W comes from HBM: a deeper ring hides its latency);
* an x loader warp: copies both halves' [BLOCK_M, BLOCK_K] rows of x into a ring of STAGES slots (TMA);
* two noise partitions (NOISE_WARPS in all), each making half of every tile's rows: read the raw tile,
  make its z with kernels.philox's own functions (so the same bits as the Triton kernels), and write
  round(W + eps z) and round(W - eps z) into the slot (each rounded once, as the materialize path and
  exact mode do: float32 eps*z, float32 sum, round to nearest even, no FMA contraction); two partitions
  run apart, so one's Philox overlaps the other's barriers and stores;
* the default warps (one warpgroup): two asynchronous wgmma per slot, one per half, each into its own
  float32 accumulator, freeing the slot once its products are done; then the bias in float32 and
  the one rounding of y (or, split-K, float32 partial sums that one launch adds in a fixed order,
  kernels.paired_linear.summed).

The seed may be read from device memory (SEED_AT, as the pass kernel's), so a CUDA graph captures the
launch. Compiled for sm_90 only (Gluon has no interpreter); the caller uses kernels/paired_linear.py
elsewhere (:func:`unfusable_reason`).
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                             warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .axpbz import _as_i32, _seed_args
from .paired_linear import _output, _workspace, summed
from .philox import box_muller, philox4x32_10

GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
PER_CALL = gl.constexpr(4)        # Gaussian elements per Philox call (a constexpr: read in kernels)
BLOCK_M = 128          # rows of each half per program: one warpgroup's two float32 accumulators
BLOCK_N = 64
BLOCK_K = 64
STAGES = 2             # slots of x rows and perturbed tiles: the noise warps, not x, are what a step waits for
W_STAGES = 6           # slots of raw W tiles: W comes from HBM, whose latency a deeper ring hides
NOISE_WARPS = 8        # two partitions of 4
NOISE_REGS = 128       # registers per noise thread (setmaxnreg); the MMA warpgroup gets the rest
LOADER_REGS = 24
MAX_SPLIT = 4
MIN_SPLIT_TILES = 16


@gluon.jit
def _noise_tile(call, seed_lo, seed_hi, key):
    """z of the 8 consecutive elements served by Philox calls ``call`` and ``call + 1`` (a 2-D int64
    tensor of even call numbers), as [..., 8] in element order (kernels.philox.gaussian_rows)."""
    k0 = seed_lo.to(gl.uint32, bitcast=True)
    k1 = seed_hi.to(gl.uint32, bitcast=True)
    c2 = gl.full(call.shape, 0, gl.uint32, call.type.layout) + key.to(gl.uint32, bitcast=True)
    c3 = gl.full(call.shape, 0, gl.uint32, call.type.layout)
    lo = (call & 0xFFFFFFFF).to(gl.uint32)
    hi = (call >> 32).to(gl.uint32)
    e0, e1, e2, e3 = philox4x32_10(lo, hi, c2, c3, k0, k1, True)
    o0, o1, o2, o3 = philox4x32_10(lo + 1, hi, c2, c3, k0, k1, True)      # call is even: no carry into hi
    n0, n1 = box_muller(e0, e1, True)
    n2, n3 = box_muller(e2, e3, True)
    n4, n5 = box_muller(o0, o1, True)
    n6, n7 = box_muller(o2, o3, True)
    # column l = 4i + 2j + k of the [.., 2, 2, 2] join holds n_l (kernels.philox.tile8)
    return gl.join(gl.join(gl.join(n0, n4), gl.join(n2, n6)), gl.join(gl.join(n1, n5), gl.join(n3, n7)))


@gluon.jit
def _noise_partition(w_raw, w_loaded, w_free, wp_smem, wm_smem, w_ready, empty, off_n, K, k_lo, k_tiles, eps,
                     seed_lo, seed_hi, seed_ptr, key, offset, ROW0: gl.constexpr, ROWS: gl.constexpr,
                     BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_STAGES: gl.constexpr, SEED_AT: gl.constexpr):
    # This partition's ROWS rows (from ROW0) of every step's tile; the other partitions make the rest.
    WARPS: gl.constexpr = gl.num_warps()
    OCTETS: gl.constexpr = BLOCK_K // 8
    # An [BLOCK_N, OCTETS] grid of 8-element runs of W: one run (16 bytes) per thread and step.
    octet_layout: gl.constexpr = gl.BlockedLayout([1, 1], [32 // OCTETS, OCTETS], [WARPS, 1], [1, 0])
    tile_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // OCTETS, OCTETS], [WARPS, 1], [1, 0])
    rows = off_n + ROW0 + gl.arange(0, ROWS, gl.SliceLayout(1, octet_layout)).to(gl.int64)
    octs = gl.arange(0, OCTETS, gl.SliceLayout(0, octet_layout)).to(gl.int64)
    if SEED_AT:      # the seed's two words in device memory (a CUDA graph's replay writes each step's there)
        seed_lo = gl.load(seed_ptr)
        seed_hi = gl.load(seed_ptr + 1)
    for i in range(k_tiles):
        j = i % W_STAGES
        mbarrier.wait(w_loaded.index(j), (i // W_STAGES) & 1)
        w = w_raw.index(j).slice(ROW0, ROWS).load(tile_layout)
        mbarrier.arrive(w_free.index(j), count=1)
        call = (rows[:, None] * K + k_lo + i * BLOCK_K + offset) // PER_CALL + 2 * octs[None, :]
        z = gl.convert_layout(gl.reshape(_noise_tile(call, seed_lo, seed_hi, key), [ROWS, BLOCK_K]), tile_layout)
        ez = eps * z
        wf = w.to(gl.float32)
        w_plus = (wf + ez).to(w.dtype)
        w_minus = (wf - ez).to(w.dtype)
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        wp_smem.index(s).slice(ROW0, ROWS).store(w_plus)
        wm_smem.index(s).slice(ROW0, ROWS).store(w_minus)
        fence_async_shared()
        mbarrier.arrive(w_ready.index(s), count=1)


@gluon.jit
def _x_loader_partition(x_desc, x_smem, x_ready, empty, off_m, M_HALF, k_lo, k_tiles, BLOCK_K: gl.constexpr,
                        STAGES: gl.constexpr):
    for i in range(k_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(x_ready.index(s), 2 * x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [off_m, k_lo + i * BLOCK_K], x_ready.index(s), x_smem.index(2 * s))
        tma.async_copy_global_to_shared(x_desc, [M_HALF + off_m, k_lo + i * BLOCK_K], x_ready.index(s),
                                        x_smem.index(2 * s + 1))


@gluon.jit
def _w_loader_partition(w_desc, w_raw, w_loaded, w_free, off_n, k_lo, k_tiles, BLOCK_K: gl.constexpr,
                        W_STAGES: gl.constexpr):
    for i in range(k_tiles):
        j = i % W_STAGES
        mbarrier.wait(w_free.index(j), ((i // W_STAGES) & 1) ^ 1)
        mbarrier.expect(w_loaded.index(j), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, k_lo + i * BLOCK_K], w_loaded.index(j), w_raw.index(j))


@gluon.jit
def _mma_partition(x_smem, wp_smem, wm_smem, x_ready, w_ready, empty, k_tiles, acc_layout: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    acc_p = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
    acc_m = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
    for i in range(k_tiles):
        s = i % STAGES
        phase = (i // STAGES) & 1
        mbarrier.wait(x_ready.index(s), phase)
        mbarrier.wait(w_ready.index(s), phase)
        acc_p = warpgroup_mma(x_smem.index(2 * s), wp_smem.index(s).permute((1, 0)), acc_p, is_async=True)
        acc_m = warpgroup_mma(x_smem.index(2 * s + 1), wm_smem.index(s).permute((1, 0)), acc_m, is_async=True)
        # The previous step's two products are done: free their slot.
        acc_p, acc_m = warpgroup_mma_wait(num_outstanding=2, deps=(acc_p, acc_m))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
    acc_p, acc_m = warpgroup_mma_wait(num_outstanding=0, deps=(acc_p, acc_m))
    return acc_p, acc_m


@gluon.jit(do_not_specialize=["eps", "seed_lo", "seed_hi", "key", "offset", "k_per_split"])
def _paired_linear_ws_kernel(x_desc, w_desc, y_ptr, bias_plus_ptr, bias_minus_ptr, M_HALF, N, K, k_per_split, eps,
                             seed_lo, seed_hi, seed_ptr, key, offset, w_layout: gl.constexpr, acc_layout: gl.constexpr,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                             STAGES: gl.constexpr, W_STAGES: gl.constexpr, NOISE_WARPS: gl.constexpr,
                             NOISE_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, HAS_BIAS: gl.constexpr,
                             DIRECT: gl.constexpr, SEED_AT: gl.constexpr):
    off_n = gl.program_id(0) * BLOCK_N
    off_m = gl.program_id(1) * BLOCK_M
    pid_s = gl.program_id(2)
    k_lo = pid_s * k_per_split
    k_tiles = (gl.minimum(K - k_lo, k_per_split) + BLOCK_K - 1) // BLOCK_K
    dtype: gl.constexpr = x_desc.dtype
    x_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    wp_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_layout)
    wm_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_layout)
    w_raw = gl.allocate_shared_memory(dtype, [W_STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    w_loaded = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    w_free = gl.allocate_shared_memory(gl.int64, [W_STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(W_STAGES):
        mbarrier.init(w_loaded.index(j), count=1)
        mbarrier.init(w_free.index(j), count=2)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
        mbarrier.init(w_ready.index(s), count=2)
        mbarrier.init(empty.index(s), count=1)
    ROWS: gl.constexpr = BLOCK_N // 2
    acc_p, acc_m = gl.warp_specialize([
        (_mma_partition, (x_smem, wp_smem, wm_smem, x_ready, w_ready, empty, k_tiles, acc_layout, BLOCK_M, BLOCK_N,
                          STAGES)),
        (_x_loader_partition, (x_desc, x_smem, x_ready, empty, off_m, M_HALF, k_lo, k_tiles, BLOCK_K, STAGES)),
        (_w_loader_partition, (w_desc, w_raw, w_loaded, w_free, off_n, k_lo, k_tiles, BLOCK_K, W_STAGES)),
        (_noise_partition, (w_raw, w_loaded, w_free, wp_smem, wm_smem, w_ready, empty, off_n, K, k_lo, k_tiles, eps,
                            seed_lo, seed_hi, seed_ptr, key, offset, 0, ROWS, BLOCK_K, STAGES, W_STAGES, SEED_AT)),
        (_noise_partition, (w_raw, w_loaded, w_free, wp_smem, wm_smem, w_ready, empty, off_n, K, k_lo, k_tiles, eps,
                            seed_lo, seed_hi, seed_ptr, key, offset, ROWS, ROWS, BLOCK_K, STAGES, W_STAGES,
                            SEED_AT)),
    ], [1, 1, NOISE_WARPS // 2, NOISE_WARPS // 2], [LOADER_REGS, LOADER_REGS, NOISE_REGS, NOISE_REGS])
    rows = off_m + gl.arange(0, BLOCK_M, gl.SliceLayout(1, acc_layout)).to(gl.int64)
    cols = off_n + gl.arange(0, BLOCK_N, gl.SliceLayout(0, acc_layout)).to(gl.int64)
    col_ok = cols < N
    mask = (rows < M_HALF)[:, None] & col_ok[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc_p += gl.load(bias_plus_ptr + cols, mask=col_ok, other=0.0).to(gl.float32)[None, :]
            acc_m += gl.load(bias_minus_ptr + cols, mask=col_ok, other=0.0).to(gl.float32)[None, :]
        out = y_ptr + rows[:, None] * N + cols[None, :]
        gl.store(out, acc_p.to(dtype), mask=mask)
        gl.store(out + M_HALF * N, acc_m.to(dtype), mask=mask)
    else:           # this split's float32 partial sums
        out = y_ptr + pid_s * (2 * M_HALF * N) + rows[:, None] * N + cols[None, :]
        gl.store(out, acc_p, mask=mask)
        gl.store(out + M_HALF * N, acc_m, mask=mask)


def unfusable_reason(x2d: torch.Tensor, weight: torch.Tensor, noise: int, offset: int) -> str | None:
    """Why :func:`paired_linear` cannot take these operands (None: it can)."""
    if noise != 0:
        return "Rademacher noise (the warp-specialized kernel makes Gaussian z)"
    if weight.dtype not in GL_DTYPES or x2d.dtype != weight.dtype:
        return f"dtypes {x2d.dtype} x {weight.dtype} (warp-specialized: float16 or bfloat16, both alike)"
    if weight.device.type != "cuda" or x2d.device != weight.device:
        return "operands not on one CUDA device"
    if _capability(weight.device)[0] != 9:
        return "not a Hopper GPU (the warp-specialized kernel uses wgmma)"
    if weight.dim() != 2 or not weight.is_contiguous() or x2d.dim() != 2 or x2d.shape[1] != weight.shape[1]:
        return "operands are not contiguous matrices of matching width"
    if x2d.shape[0] % 2:
        return f"an odd number of rows ({x2d.shape[0]})"
    if weight.shape[1] % 8 or offset % 8:
        return f"in-features {weight.shape[1]} or offset {offset} not a multiple of 8 (a run of 8 elements is 2 calls)"
    if weight.data_ptr() % 16 or (x2d.is_contiguous() and x2d.data_ptr() % 16):
        return "an operand's address is not 16-byte aligned (TMA)"
    return None


@functools.lru_cache(maxsize=None)
def _layouts(dtype, block_m: int, block_n: int, block_k: int):
    g = GL_DTYPES[dtype]
    x_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], g)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], g)
    acc_layout = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, block_n, 16])
    return x_layout, w_layout, acc_layout


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple:
    """Asked once per device: unfusable_reason runs for every nn.Linear of every paired forward."""
    return torch.cuda.get_device_capability(device)


def default_split(tiles: int, k_tiles: int, sms: int) -> int:
    """Splits of K for a launch of ``tiles`` output tiles: none where the tiles fill the GPU, else
    enough for about two programs per SM, keeping each split at least MIN_SPLIT_TILES steps long and
    the float32 workspace (one [M, N] slice per split) to at most MAX_SPLIT."""
    if tiles >= sms:
        return 1
    return max(1, min(MAX_SPLIT, (2 * sms) // max(1, tiles), k_tiles // MIN_SPLIT_TILES))


def paired_linear(x2d: torch.Tensor, weight: torch.Tensor, eps: float, seed, key: int, noise: int = 0,
                  offset: int = 0, bias_plus=None, bias_minus=None, *, split: int | None = None) -> torch.Tensor:
    """[M, N] in x2d's dtype, as kernels.paired_linear.paired_linear: rows :M/2 times round(W + eps z)^T,
    rows M/2: times round(W - eps z)^T, plus the halves' biases added in float32 before the one
    rounding. ``seed``: a uint64, or an int32 tensor of its two words on the device
    (kernels.axpbz.seed_words), read when the kernel runs (what a CUDA graph captures). ``split``
    (None: :func:`default_split`) splits K; with more than one split the programs
    write float32 partial sums that torch adds in a fixed order (the same result run to run)."""
    reason = unfusable_reason(x2d, weight, noise, offset)
    if reason is not None:
        raise ValueError(f"paired_linear_ws: {reason}")
    x2d = x2d.contiguous()
    m, k = x2d.shape
    n, h = weight.shape[0], m // 2
    block_m = BLOCK_M if h > 64 else 64
    x_layout, w_layout, acc_layout = _layouts(weight.dtype, block_m, BLOCK_N, BLOCK_K)
    k_tiles = triton.cdiv(k, BLOCK_K)
    tiles = triton.cdiv(n, BLOCK_N) * triton.cdiv(h, block_m)
    split = default_split(tiles, k_tiles, _sms(weight.device)) if split is None else max(1, min(split, k_tiles))
    k_per_split = triton.cdiv(k_tiles, split) * BLOCK_K
    split = triton.cdiv(k, k_per_split)
    out = _output(m, n, x2d.dtype, x2d.device) if split == 1 else _workspace(split, m, n, x2d.device)
    has_bias = bias_plus is not None
    seed_lo, seed_hi, seed_ptr, seed_at = _seed_args(seed, weight)
    if m and n:
        x_desc = TensorDescriptor(x2d, list(x2d.shape), list(x2d.stride()), [block_m, BLOCK_K], x_layout)
        w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [BLOCK_N, BLOCK_K], w_layout)
        _paired_linear_ws_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(h, block_m), split)](
            x_desc, w_desc, out, bias_plus if has_bias else weight, bias_minus if has_bias else weight, h, n, k,
            k_per_split, float(eps), seed_lo, seed_hi, seed_ptr, _as_i32(key & 0xFFFFFFFF), offset, w_layout,
            acc_layout, block_m, BLOCK_N, BLOCK_K, STAGES, W_STAGES, NOISE_WARPS, NOISE_REGS, LOADER_REGS, has_bias,
            split == 1, seed_at, num_warps=4, enable_fp_fusion=False)
    return out if split == 1 else summed(out, bias_plus, bias_minus, x2d.dtype)
