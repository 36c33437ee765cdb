"""Paired mode's LayerNorm: both halves of a doubled batch in one launch, each half with its own affine.

    y[r] = (x[r] - mean(x[r])) / sqrt(var(x[r]) + eps) * w[h] + b[h]      h = 0 for r < R/2, else 1

over the normalized (last) elements of each of the R rows; rows 0..R/2-1 are the + half (a doubled
batch flattened batch-major). ``w`` and ``b`` are [2, N] (the + and - copies of a trained parameter),
[N] (a frozen one, for both halves) or None. Statistics in float32 (two passes over the row held in
registers: the mean, then the variance of the deviations), one round to nearest to x's dtype.

Why a kernel: F.layer_norm per half and a concatenation read and write the activations three times;
this reads and writes them once. The result is F.layer_norm's up to the rounding of the statistics
(torch sums in another order), which the tests bound.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .philox import round_to_nearest

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: The most normalized elements a row may have (one program holds its row in registers).
MAX_ELEMENTS = 1 << 15


@triton.jit(do_not_specialize=["half_rows", "eps"])
def _paired_layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, half_rows, N, W_STRIDE, B_STRIDE, eps,
                              HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    d = tl.where(ok, x - mean, 0.0)
    var = tl.sum(d * d, axis=0) / N
    y = d * (1.0 / tl.sqrt_rn(var + eps))
    minus = (row >= half_rows).to(tl.int64)          # a - half's row: its parameters' second copy
    if HAS_W:
        y = y * tl.load(w_ptr + minus * W_STRIDE + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(b_ptr + minus * B_STRIDE + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, round_to_nearest(y, y_ptr.dtype.element_ty, FAST), mask=ok)


def unfusable_reason(x: torch.Tensor, normalized_shape, weight, bias) -> str | None:
    """Why :func:`paired_layer_norm` cannot take these operands (None: it can)."""
    n = math.prod(normalized_shape)
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype}"
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != tuple(normalized_shape) or x.numel() == 0:
        return f"input {tuple(x.shape)} does not end in {tuple(normalized_shape)}"
    if n > MAX_ELEMENTS:
        return f"{n} normalized elements (at most {MAX_ELEMENTS})"
    rows = x.numel() // n
    if rows % 2:
        return f"{rows} rows (a doubled batch has an even number)"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dtype != x.dtype or p.device != x.device or p.numel() not in (n, 2 * n)):
            return f"{name} {tuple(p.shape)} {p.dtype} does not match the input {x.dtype} of {n} elements"
    return None


def paired_layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of each half of ``x`` with its own affine (see the module docstring); no autograd."""
    reason = unfusable_reason(x, normalized_shape, weight, bias)
    if reason is not None:
        raise ValueError(f"paired_layer_norm: {reason}")
    n = math.prod(normalized_shape)
    x2 = x.contiguous().view(-1, n)
    y = _output(x2)
    (w, w_stride), (b, b_stride) = (_halves(p, n) for p in (weight, bias))
    block = triton.next_power_of_2(n)
    _paired_layer_norm_kernel[(x2.shape[0],)](
        x2, x2 if w is None else w, x2 if b is None else b, y, x2.shape[0] // 2, n, w_stride, b_stride,
        float(eps), HAS_W=w is not None, HAS_B=b is not None, BLOCK=block, FAST=not _INTERPRETING,
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return y.view(x.shape)


def _halves(p, n: int):
    """(tensor, elements from the + half's row to the - half's): a parameter with one copy per half as a
    [2, n] view (the copies of a pair buffer need not be adjacent), a shared one as [n] with 0; (None, 0)."""
    if p is None:
        return None, 0
    if p.numel() == n:
        return p.reshape(n).contiguous(), 0
    try:
        rows = p.view(2, n)
    except RuntimeError:                 # the copy's own elements not one contiguous run
        rows = p.reshape(2, n).contiguous()
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows, rows.stride(0)


def _output(x2: torch.Tensor) -> torch.Tensor:
    """y, every element written by the kernel."""
    return torch.empty_like(x2)
