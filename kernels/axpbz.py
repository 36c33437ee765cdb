"""The fused pass: x <- a * x + b * z(seed, key), one read and one write of x, z made in registers.

Every MeZO pass is this one kernel with different (a, b):
  perturb by alpha            a = 1,             b = alpha
  restore and update          a = 1 - lr * wd,   b = (1 - lr * wd) * eps - lr * g
Arithmetic is float32; the result is rounded once to x's dtype.

A program covers CALLS consecutive Philox calls, i.e. CALLS * PER_CALL consecutive elements
(PER_CALL = 4 for Gaussian, 128 for Rademacher), so one call's outputs feed neighbouring elements and
loads stay contiguous. Blocks are aligned to the *global* element index (offset + local index), so the
noise never depends on the block size or on where a shard starts. FAST (fast sin/cos) is on for
compiled kernels and off in the interpreter, which has no libdevice.
"""
import os

import triton
import triton.language as tl

from .philox import gaussian_block, rademacher_block

# Default elements per program. Large blocks keep the interpreter (which runs programs one by one)
# fast; on the GPU 4096 elements per program with 4 warps is a sound starting point.
DEFAULT_BLOCK = 4096
INTERPRETER_BLOCK = 1 << 16


# n is left to Triton's specialization (divisibility by 16 lets masked loads vectorize); the seed,
# key, offset and coefficients are not, so they never cause a recompilation.
@triton.jit(do_not_specialize=["a", "b", "seed_lo", "seed_hi", "key", "offset"])
def _axpbz_kernel(x_ptr, n, a, b, seed_lo, seed_hi, key, offset,
                  NOISE: tl.constexpr, CALLS: tl.constexpr, LOAD_X: tl.constexpr, FAST: tl.constexpr,
                  ALIGNED: tl.constexpr):
    PER_CALL: tl.constexpr = 4 if NOISE == 0 else 128
    BLOCK: tl.constexpr = CALLS * PER_CALL
    pid = tl.program_id(0).to(tl.int64)
    offset = offset.to(tl.int64)
    first = offset // PER_CALL + pid * CALLS                 # this program's first Philox call
    ctr = first + tl.arange(0, CALLS).to(tl.int64)
    if NOISE == 0:
        z = gaussian_block(ctr, seed_lo, seed_hi, key, FAST)
    else:
        z = rademacher_block(ctr, seed_lo, seed_hi, key)
    if ALIGNED:
        # offset % PER_CALL == 0: blocks start at multiples of BLOCK in x, which Triton can see, so
        # loads and stores become 16-byte vector accesses (2x faster than the general form on H200).
        idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
    else:
        idx = first * PER_CALL - offset + tl.arange(0, BLOCK).to(tl.int64)   # index into x
        mask = (idx >= 0) & (idx < n)
    if LOAD_X:
        x = tl.load(x_ptr + idx, mask=mask).to(tl.float32)
        y = a * x + b * z
    else:
        y = b * z
    tl.store(x_ptr + idx, y.to(x_ptr.dtype.element_ty), mask=mask)


# Triton reads TRITON_INTERPRET when it is imported, so it cannot change later: read it once here
# rather than on every launch (the values triton accepts; fastmezo.backends.triton_interpreter_on
# reads it the same way). No fastmezo import here: this package must import on its own.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _as_i32(word: int) -> int:
    """uint32 -> the int32 with the same bits (one kernel signature whatever the value)."""
    return word - (1 << 32) if word >= (1 << 31) else word


def axpbz_(x, a: float, b: float, seed: int, key: int, noise: int, offset: int = 0,
           block: int | None = None, load_x: bool = True, num_warps: int = 4) -> None:
    """Launch the fused pass on one contiguous tensor x (any floating dtype, any device Triton runs on).

    seed is a uint64, key a uint32, noise 0 (Gaussian) or 1 (Rademacher), offset the global index of
    x's first element (non-zero for a shard of a larger tensor). With load_x=False, x <- b * z.
    """
    n = x.numel()
    if n == 0:
        return
    per_call = 4 if noise == 0 else 128
    if block is None:
        block = INTERPRETER_BLOCK if x.device.type == "cpu" else DEFAULT_BLOCK
    block = max(block, per_call)
    grid = (triton.cdiv(n + offset % per_call, block),)
    _axpbz_kernel[grid](x, n, float(a), float(b), _as_i32(seed & 0xFFFFFFFF), _as_i32(seed >> 32),
                        _as_i32(key & 0xFFFFFFFF), offset,
                        NOISE=noise, CALLS=block // per_call, LOAD_X=load_x, FAST=not _INTERPRETING,
                        ALIGNED=offset % per_call == 0, num_warps=num_warps)
