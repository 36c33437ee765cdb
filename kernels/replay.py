"""Fused replay: K consecutive MeZO steps applied in one read and one write of the weights.

Replaying a trajectory (fastmezo.replayer) pass by pass reads and writes every weight once per pass:
bound by memory like training's passes. Here a program loads its block of x once, then for each step
makes that step's z in registers (the same device functions, block alignment and counters as the
single pass of kernels/axpbz.py) and applies the step's passes one after the other, each as the
single pass computes it: y = a * x + b * z in float32 (no FMA contraction), rounded to the storage
dtype (to nearest, or stochastically with that pass's rounding draws), and read back as float32 for
the next pass; it stores x once at the end. Per element and pass the arithmetic is the single pass's,
so the result is bit-identical to the passes run one by one with the Triton backend: for exact mode's
update-only steps and accumulated steps, and for in-place steps too (their +eps / -2 eps / restore
passes are passes of the same form and are in the pass list; the step's z is made once for all of them).

Tables (device tensors, built per launch group by :func:`fused_replay_`): per step (seed low, seed high,
first pass, end pass) as int32; per pass (a, b) as float32 and (rounding seed low, high, whether the
pass rounds stochastically) as int32: a step may round its perturbation passes to nearest and its
update stochastically (MeZO's default), so the choice is made per pass, at run time.
"""
import torch
import triton
import triton.language as tl

from .axpbz import _INTERPRETING, _NO_FMA_CONTRACTION, DEFAULT_BLOCK, INTERPRETER_BLOCK, _alignment, _as_i32
from .philox import gaussian_block, rademacher_block, round_stochastic, round_to_nearest, rounding_draws


@triton.jit(do_not_specialize=["n", "offset", "key", "n_steps"])
def _replay_kernel(x_ptr, n, offset, key, steps_ptr, coef_ptr, rseed_ptr, n_steps, NOISE: tl.constexpr,
                   BLOCK: tl.constexpr, ROUND: tl.constexpr, FAST: tl.constexpr):
    PER_CALL: tl.constexpr = 4 if NOISE == 0 else 128
    G: tl.constexpr = 8 if NOISE == 0 else 128
    pid = tl.program_id(0).to(tl.int64)
    first_global = (offset // G) * G + pid * BLOCK          # global index of this block's first element
    idx = first_global - offset + tl.arange(0, BLOCK).to(tl.int64)
    mask = (idx >= 0) & (idx < n)
    ELEM = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + idx, mask=mask).to(tl.float32)
    ctr = first_global // PER_CALL + tl.arange(0, BLOCK // PER_CALL).to(tl.int64)
    for s in range(n_steps):
        seed_lo = tl.load(steps_ptr + 4 * s)
        seed_hi = tl.load(steps_ptr + 4 * s + 1)
        if NOISE == 0:
            z = gaussian_block(ctr, seed_lo, seed_hi, key, FAST)
        else:
            z = rademacher_block(ctr, seed_lo, seed_hi, key, FAST)
        for p in range(tl.load(steps_ptr + 4 * s + 2), tl.load(steps_ptr + 4 * s + 3)):
            a = tl.load(coef_ptr + 2 * p)
            b = tl.load(coef_ptr + 2 * p + 1)
            y = a * x + b * z
            if ROUND:
                if tl.load(rseed_ptr + 3 * p + 2) != 0:
                    r = rounding_draws(first_global // 8, BLOCK // 8, tl.load(rseed_ptr + 3 * p),
                                       tl.load(rseed_ptr + 3 * p + 1), key, FAST)
                    x = round_stochastic(y, r, ELEM, FAST).to(tl.float32)
                else:
                    x = round_to_nearest(y, ELEM, FAST).to(tl.float32)
            else:
                x = round_to_nearest(y, ELEM, FAST).to(tl.float32)
    tl.store(x_ptr + idx, x.to(ELEM), mask=mask)


def _tables(steps, device):
    """(steps int32 [S, 4], coefficients float32 [P, 2], rounding seeds and flags int32 [P, 3], whether
    any pass rounds stochastically) of ``steps`` = [(seed, [(a, b, round_seed or None), ...]), ...]."""
    rows, coefs, rseeds, rounding = [], [], [], set()
    for seed, passes in steps:
        rows.append((_as_i32(seed & 0xFFFFFFFF), _as_i32(seed >> 32), len(coefs), len(coefs) + len(passes)))
        for a, b, rs in passes:
            coefs.append((a, b))
            rounding.add(rs is not None)
            rseeds.append((_as_i32((rs or 0) & 0xFFFFFFFF), _as_i32((rs or 0) >> 32), int(rs is not None)))
    as_tensor = lambda v, dt, cols: torch.tensor(v or [[0] * cols], dtype=dt, device=device)  # noqa: E731
    return (as_tensor(rows, torch.int32, 4), as_tensor(coefs, torch.float32, 2),
            as_tensor(rseeds, torch.int32, 3), True in rounding)


def fused_replay_(tensors, keys, noise: int, steps, offsets=None, *, block: int | None = None,
                  num_warps: int = 4) -> None:
    """Apply ``steps`` = [(seed, [(a, b, round_seed or None), ...]), ...] to each contiguous tensor of
    one device, in place, in one pass over it: x <- round(a * x + b * z(seed, key)) for every pass of
    every step, in order. Bit-identical to the same passes run one by one with kernels.axpbz."""
    if not steps:
        return
    live = [(t, k, o) for t, k, o in zip(tensors, keys, offsets or [0] * len(tensors)) if t.numel()]
    if not live:
        return
    device = live[0][0].device
    step_table, coef_table, rseed_table, rounding = _tables(steps, device)
    if block is None:
        block = INTERPRETER_BLOCK if device.type == "cpu" else DEFAULT_BLOCK
    g = _alignment(noise)
    block = max(block, g)
    for t, key, off in live:
        if not t.is_contiguous():
            raise ValueError("fused replay needs contiguous tensors")
        grid = (-(-(t.numel() + off % g) // block),)
        _replay_kernel[grid](t, t.numel(), off, _as_i32(key & 0xFFFFFFFF), step_table, coef_table, rseed_table,
                             len(steps), NOISE=noise, BLOCK=block, ROUND=rounding and t.dtype != torch.float32,
                             FAST=not _INTERPRETING, num_warps=num_warps, **_NO_FMA_CONTRACTION)
