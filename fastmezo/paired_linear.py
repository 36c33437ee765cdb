"""Paired mode's nn.Linear: both halves of the doubled batch, by materialized copies or by the fused kernel.

fastmezo.paired runs every module owning a trained parameter once per half with materialized copies
round(W +- eps*z). A plain ``nn.Linear`` takes one of two faster paths here:

* *materialized* (the default, :func:`materialized_or_none`): one pass makes z once and writes both
  copies into one buffer viewed as [2, out, in] (fastmezo.paired_copies), and ONE batched matmul
  multiplies each half of the input by its copy, straight into the output (with a bias, one matmul per
  half, whose epilogue adds that half's bias). Its cost is a pass over W
  that writes two copies plus cuBLAS reading them; it holds two copies of one weight at a time (a
  weight above fastmezo.paired_copies.MAX_COPY_BYTES, an lm_head, a slab of output rows at a time).
* *fused* (:func:`fused_or_none`): both halves in one read of W with z generated on chip and no copy
  written: the least memory. On a Hopper GPU (float16 / bfloat16, Gaussian noise) the kernel is
  fastmezo.kernels.paired_linear_ws, whose noise is made by warps of their own beside the tensor-core
  warps; it makes z once per weight tile for up to 128 rows a half, and there a graphed step is as
  fast as the copies' (docs/perf.md). Elsewhere fastmezo.kernels.paired_linear, a Triton kernel far
  below cuBLAS's speed, taken only when asked for.

``fused`` (``fastmezo.patch(model, mode="paired", fused=...)``, ``PairedPerturbation(fused=...)``):
None (default) fuses by the Hopper kernel up to :data:`DEFAULT_MAX_ROWS` rows of the module's input
(batch and sequence flattened), and never by the Triton kernel; an int is the row threshold for either
kernel; True fuses whatever the rows, False never. The fused path
also needs: the plan's backend for the device is Triton (compiled on CUDA; the interpreter on CPU
when the backend is forced to "triton" with TRITON_INTERPRET=1), a plain ``nn.Linear`` forward with
the input as its only argument, the weight trained, the input's dtype the weight's, and in-features
and offset multiples of the elements per Philox call
(:func:`fastmezo.kernels.paired_linear.unfusable_reason`); otherwise the module is materialized.
Under torch.compile or a dispatch mode the generic path runs (the kernel and the batched matmul into
a given output are plain, autograd-free calls).

Both paths compute the same perturbed weights bit for bit (the kernel rounds each tile as the copies
are rounded); their outputs differ only by the summation order of the matmul.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from . import ops, paired_copies

#: Rows (the doubled batch times the sequence) up to which an nn.Linear takes the Hopper fused kernel by
#: default: one block of rows a half, within which it makes z once per weight tile; beyond, z again for
#: every block, and the copies' path is faster (docs/perf.md). The Triton fused kernel is slower than
#: the copies at every row count: by default never.
DEFAULT_MAX_ROWS = 256

#: An lm_head's slabs of output rows (materialize path) are multiples of this many rows.
SLAB_ALIGN = 128


def max_rows_of(fused) -> int:
    """The row threshold that ``fused`` (None, True, False or an int >= 0) stands for."""
    if fused is None:
        return DEFAULT_MAX_ROWS
    if isinstance(fused, bool):
        return sys.maxsize if fused else 0
    if isinstance(fused, int) and fused >= 0:
        return fused
    raise ValueError(f"fused must be None (automatic), True, False or a number of rows >= 0, not {fused!r}")


_modules = {}


def _kernel(name: str = "paired_linear"):
    """(fastmezo.kernels.<name>, backends.triton), imported on first use (triton may be missing) and
    kept: a forward calls this once per module. The warp-specialized kernel is None where this triton
    has no Gluon (before 3.5)."""
    if not _modules:
        from .backends import triton as triton_backend
        from .kernels import paired_layer_norm, paired_linear
        try:
            from .kernels import paired_linear_ws
        except ImportError:
            paired_linear_ws = None
        _modules.update(paired_linear=paired_linear, paired_layer_norm=paired_layer_norm,
                        paired_linear_ws=paired_linear_ws, backend=triton_backend)
    return _modules[name], _modules["backend"]


def fused_capturable(plan, device: torch.device) -> bool:
    """Whether a CUDA graph may capture fused forwards of ``plan`` on ``device``: the Hopper kernel, the
    only fused kernel that reads the seed from device memory, takes every matrix of the plan (a Hopper
    GPU, Gaussian noise, float16 / bfloat16 matrices). A module it still refuses in a capture (an input
    that is not 16-byte aligned) runs on the copies there (fused_or_none)."""
    hopper = _kernel("paired_linear_ws")[0]
    return (hopper is not None and device.type == "cuda" and hopper._capability(device)[0] == 9
            and plan.noise == 0 and all(t.dtype in hopper.GL_DTYPES for t in plan.tensors if t.dim() == 2))


def only_input(args, kwargs):
    """The one argument of a module call made with only its input (positional or ``input=``), else None."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return kwargs.get("input") if not args and len(kwargs) == 1 else None


def fused_or_none(provider, module, args, kwargs, rows: int, max_rows: int):
    """The output of ``module`` on a doubled batch of ``rows`` rows by the fused kernel, or None where
    the materialize path must run it (see the module docstring for when)."""
    if max_rows <= 0 or type(module).forward is not torch.nn.Linear.forward:
        return None
    x = only_input(args, kwargs)
    plan, seed, entries = provider._active
    weight, bias = module.weight, module.bias
    entry = entries.get(id(weight))
    if (entry is None or type(x) is not torch.Tensor or x.dim() < 2 or x.shape[0] < 2 or x.shape[0] % rows
            or ops.tracing()):
        return None
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] > max_rows:
        return None
    kernel, triton_backend = _kernel()
    if plan.backend_of(x.device) is not triton_backend:
        return None
    with _paused(provider._checker):     # fastmezo's own reads of the stored weights
        key, offset, eps = entry
        hopper = _kernel("paired_linear_ws")[0]
        if hopper is not None and x.is_cuda and hopper.unfusable_reason(x2d, weight, plan.noise, offset) is None:
            kernel = hopper
        elif provider.fused_auto or isinstance(seed, torch.Tensor):
            return None     # automatic: the Hopper kernel only; a CUDA graph's capture: the Triton kernel
                            # cannot read the seed from device memory, the copies can
        elif kernel.unfusable_reason(x2d, weight, plan.noise, offset) is not None:
            return None
        bias_plus = bias_minus = bias
        b_entry = None if bias is None else entries.get(id(bias))
        if b_entry is not None:          # the bias is tiny: materialized, as the other path does
            (bias_plus,), (bias_minus,) = provider.copies.pairs([bias])
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            if x.device.type == "cpu":   # the interpreter's module state is shared: the backend's lock
                with triton_backend._interpreter_lock:
                    y = kernel.paired_linear(x2d, weight, eps, seed, key, plan.noise, offset, bias_plus, bias_minus)
            else:
                y = kernel.paired_linear(x2d, weight, eps, seed, key, plan.noise, offset, bias_plus, bias_minus)
        finally:
            torch.set_grad_enabled(grad)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def materialized_or_none(provider, module, args, kwargs, rows: int):
    """The output of a plain ``nn.Linear`` on a doubled batch of ``rows`` rows from both halves' copies
    (one pair pass, the copies stacked as [2, out, in]) by ONE batched matmul over the two halves (with
    a bias, a matmul per half), written straight into the output; or None where the generic path (the
    module's own forward once per half) must run it. The same products as that path's F.linear per half,
    summed by cuBLAS's kernels (float rounding may differ), without a concatenation."""
    if type(module).forward is not torch.nn.Linear.forward:
        return None
    x = only_input(args, kwargs)
    weight, bias = module.weight, module.bias
    entries = provider._active[2]
    if (id(weight) not in entries or type(x) is not torch.Tensor or x.dim() < 2 or x.shape[0] < 2
            or x.shape[0] % rows or x.dtype != weight.dtype or x.device != weight.device or ops.tracing()
            or torch.is_autocast_enabled(x.device.type)):
        return None
    copies = provider.copies
    n_out, k = weight.shape
    # A weight above MAX_COPY_BYTES (an lm_head over a large vocabulary): copies a slab of rows at a time,
    # a multiple of SLAB_ALIGN rows (cuBLAS's fast kernels want each slab's rows 16-byte aligned).
    slab = paired_copies.MAX_COPY_BYTES // (k * x.element_size())         # x has the weight's dtype
    slab = max(1, slab - slab % SLAB_ALIGN if slab >= SLAB_ALIGN else slab)
    if n_out > slab:
        with _paused(provider._checker):
            if not weight.is_contiguous():
                return None
    # dim 0 is a multiple of the doubled batch, batch-major: its first half is the + half's rows
    x3 = x.reshape(2, -1, k)
    y = torch.empty(2, x3.shape[1], n_out, dtype=x.dtype, device=x.device)
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        with _paused(provider._checker):     # fastmezo's own reads of the stored weights
            b2 = bias if bias is None or id(bias) not in entries else copies.stacked(bias)   # [out] or [2, out]
            if n_out <= slab:
                _matmul(x3, copies.stacked(weight), b2, y)
            else:                            # a large weight (an lm_head): its copies a slab of rows at a time
                key, offset, eps = entries[id(weight)]
                w = weight.detach()
                for r0 in range(0, n_out, slab):
                    r1 = min(n_out, r0 + slab)
                    w2 = paired_copies.pair_buffer((r1 - r0) * k, w.dtype, w.device)[:2 * (r1 - r0) * k]
                    w2 = w2.view(2, r1 - r0, k)
                    copies.pair_pass([w[r0:r1]], [w2[0]], [w2[1]], [key], [offset + r0 * k], [eps])
                    # Into the slab's columns of y (rows of stride n_out, which cuBLAS writes as they are).
                    _matmul_halves(x3, w2, None if b2 is None else b2[..., r0:r1], y[..., r0:r1])
                    del w2
    finally:
        torch.set_grad_enabled(grad)
    return y.view(*x.shape[:-1], n_out)


def layer_norm_or_none(provider, module, args, kwargs, rows: int):
    """The output of a plain ``nn.LayerNorm`` on a doubled batch, or None. Where the plan's backend is
    Triton: both halves with their copies by one launch of fastmezo.kernels.paired_layer_norm; else
    F.layer_norm of each half with its copies and a concatenation (what the generic path computes,
    without swapping the module's parameters twice)."""
    if type(module).forward is not torch.nn.LayerNorm.forward:
        return None
    x = only_input(args, kwargs)
    if type(x) is not torch.Tensor or x.dim() < 2 or x.shape[0] < 2 or x.shape[0] % rows or ops.tracing():
        return None
    plan, _, entries = provider._active
    params = (module.weight, module.bias)
    if getattr(plan.backend_of(x.device), "NAME", None) == "triton" and not torch.is_autocast_enabled(x.device.type):
        # Both halves in one launch, no concatenation (kernels/paired_layer_norm.py)
        kernel, triton_backend = _kernel("paired_layer_norm")
        with _paused(provider._checker):     # fastmezo's own reads of the stored weights
            if kernel.unfusable_reason(x, module.normalized_shape, *params) is None:
                w2, b2 = (None if p is None else provider.copies.stacked(p) if id(p) in entries else p.detach()
                          for p in params)
                grad = torch.is_grad_enabled()
                torch.set_grad_enabled(False)
                try:
                    with triton_backend._interpreter_lock if x.device.type == "cpu" else contextlib.nullcontext():
                        return kernel.paired_layer_norm(x, module.normalized_shape, w2, b2, module.eps)
                finally:
                    torch.set_grad_enabled(grad)
    trained = [p for p in params if p is not None and id(p) in entries]
    with _paused(provider._checker):     # fastmezo's own reads of the stored weights
        plus, minus = provider.copies.pairs(trained)
    made_plus, made_minus = dict(zip(map(id, trained), plus)), dict(zip(map(id, trained), minus))
    h = x.shape[0] // 2
    halves = []
    for rows_of, made in ((x[:h], made_plus), (x[h:], made_minus)):
        w, b = (None if p is None else made.get(id(p), p) for p in params)
        halves.append(torch.nn.functional.layer_norm(rows_of, module.normalized_shape, w, b, module.eps))
    return torch.cat(halves)


def _matmul(x3, w2, b2, out) -> None:
    """out <- x3 @ w2^T (+ b2) over the two halves: one batched call without a bias; with one (``b2`` of
    [out] for both halves or [2, out], one per half) a call per half, whose bias cuBLAS adds in the
    GEMM's epilogue (baddbmm would first write the bias broadcast into all of ``out``, then read it
    back: a copy of the output per module)."""
    if b2 is None:
        torch.bmm(x3, w2.transpose(1, 2), out=out)
    else:
        _matmul_halves(x3, w2, b2, out)


def _matmul_halves(x3, w2, b2, out) -> None:
    """:func:`_matmul` by one call per half (``out`` may be a slab of columns of a larger output)."""
    for h in range(2):
        if b2 is None:
            torch.mm(x3[h], w2[h].t(), out=out[h])
        else:
            torch.addmm(b2[h] if b2.dim() == 2 else b2, x3[h], w2[h].t(), out=out[h])


class _paused:
    """The first forward's read check (fastmezo.exact_read_check._ReadCheck) off for fastmezo's own reads (a
    plain class: entered once per module call, where a generator-based context costs more)."""
    __slots__ = ("checker",)

    def __init__(self, checker):
        self.checker = checker

    def __enter__(self):
        if self.checker is not None:
            self.checker.paused += 1

    def __exit__(self, *exc):
        if self.checker is not None:
            self.checker.paused -= 1
