"""Paired mode: both perturbed forwards of a MeZO step in ONE forward over a doubled batch.

The batch is stacked twice along dim 0 (rows 0..B-1 the "+" half, rows B..2B-1 the "-" half). Every
module that owns a trained parameter runs its own forward twice, once per half: on the first half with
W + eps*z, on the second with W - eps*z, and the two outputs are stacked again. The losses of the two
halves are l+ and l-. The stored weights are only read until the update pass, which is exact mode's
(fastmezo.exact): theta <- (1 - lr * wd) * theta - lr * g * z, so a step with lr = 0 leaves them
bit-identical and nothing drifts.

How z reaches the perturbed weights: per module call, the copies round(W +- eps*z) of its trained
tensors are made by the contract's out-of-place pass, the arithmetic exact mode's copies have, both
halves' copies by one pass that makes z once (fastmezo.paired_copies: what is alive when). So a paired
step equals an exact-mode step up to the rounding of batch-size-dependent kernels. A plain
nn.Embedding perturbs only the rows its ids look up (a row is a contiguous range of its stream); a
tied use of the same weight (an lm_head) is its own module call and sees the whole perturbed weight.
The alternative for nn.Linear, x W^T over the doubled batch plus +-eps * x z^T per half,
would double the matmul FLOPs (a loss where large batches are compute-bound) and would not round the
perturbed weight as exact mode does (in bfloat16 that rounding is of the order of eps*z itself).
A plain nn.Linear multiplies both halves by one batched matmul over its stacked copies, or (by
default on Hopper for small batches) by a fused kernel that reads W once and makes the same rounded
tiles on chip; a plain nn.LayerNorm on the Triton backend normalizes both halves with their own affine
in one launch (fastmezo.paired_linear).

Any module works this way: nn.Linear, nn.Embedding, LayerNorm, RMSNorm and the modules of
transformers are split along dim 0 of their tensor arguments; a module of another kind owning a
trained parameter gets a one-line notice (its arguments must be batch-first too). A module nested in
one that is already running a half (a parameter owned by a parent) uses that half's copies. A model
whose forward mixes batch rows (batch norm in training mode) is refused: the halves would see each
other.

This module holds the perturbation provider (the wrapped forwards and the perturbed copies). The rows
of the doubled batch and the loss of each half are fastmezo.paired_batch; the handle of
``fastmezo.patch(model, mode="paired")`` is fastmezo.paired_patch, and the CUDA graphs of its forwards
fastmezo.paired_graphs.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.utils import _pytree as pytree

from . import ops
from .exact_read_check import _ReadCheck
from .paired_batch import PairedModeError, _half, _rows, _split, _stack
from .paired_copies import ForwardCopies
from .paired_linear import (_paused, fused_or_none, layer_norm_or_none, materialized_or_none, max_rows_of,
                            only_input)


#: Module kinds whose forward is row-wise along every leading dimension (checked by the tests).
KNOWN = (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm) + (
    (torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def _known(module) -> bool:
    return isinstance(module, KNOWN) or type(module).__name__.endswith("RMSNorm")


class PairedPerturbation:
    """Perturbation provider of paired mode (``fastmezo.patch(model, mode="paired")``).

    Wraps the forward of every module owning one of ``params`` (an instance attribute, removed by
    :meth:`remove`); outside :meth:`perturbation` the wrapped forwards are the original ones.
    ``fused``: when an nn.Linear takes the fused kernel instead of materialized copies (None: the
    Hopper kernel up to fastmezo.paired_linear.DEFAULT_MAX_ROWS rows; an int: either kernel up to that
    many rows; True / False: always / never);
    :attr:`paths` says which path each module took in the last paired forward.
    """

    mode = "paired"

    def __init__(self, model: torch.nn.Module, params=None, *, check_reads: bool = True, fused=None):
        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        names = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), name)
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(f"parameter {i} of paired mode is not a parameter of this model")
        wanted = {id(p) for p in params}
        self.model = model
        self.names = {pid: names[pid] for pid in wanted}
        self._batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self._owned: dict[torch.nn.Module, list[str]] = {}
        self._module_names = {}
        for mname, module in model.named_modules():
            self._module_names[module] = mname or "<root>"
            own = [n for n, p in module.named_parameters(recurse=False, remove_duplicate=False) if id(p) in wanted]
            if own:
                if "forward" in module.__dict__:
                    raise PairedModeError(f"module {mname!r} already has its own forward attribute (another "
                                          "patch?); paired mode will not replace it")
                self._owned[module] = own
        other = sorted({type(m).__name__ for m in self._owned if not _known(m)})
        if other:
            warnings.warn(f"paired mode: {', '.join(other)} own trained parameters; they run once per half with "
                          "materialized W +- eps*z, their tensor arguments split along dim 0", stacklevel=3)
        self._active = None          # (plan, seed, {id(tensor): (key, offset, eps)}) during a forward
        self._half = None            # +1 or -1: the half a wrapped module is running now
        self.copies = None           # the perturbed copies of the running forward (ForwardCopies)
        self._held: dict = {}        # the small tensors' copy buffers, held between forwards
        self._order: list = []       # the large tensors in the order the last forward asked for them
        self._check_reads = bool(check_reads)
        self._checker = None
        #: Rows of the doubled batch of the running forward (set by PairedPatch); None: each wrapped
        #: module takes the most rows among its tensor arguments.
        self.rows = None
        self.max_rows = max_rows_of(fused)
        self.fused_auto = fused is None       # the automatic choice takes only the Hopper kernel
        #: {module name: "fused" or "materialized"}: the path of each module in the last paired forward.
        self.paths: dict[str, str] = {}
        for module in self._owned:
            module.forward = self._wrap(module, module.forward)

    # -- the provider interface (engine.Paired, optim._strategy) --------------------------------------
    @property
    def active(self) -> bool:
        return self._owned is not None

    def covered(self, tensors) -> list[int]:
        return [i for i, t in enumerate(tensors) if id(t) not in self.names]

    @contextlib.contextmanager
    def perturbation(self, plan, seed: int, eps_of_group):
        """Forwards inside the context are paired: the first half of every batch sees tensor_i +
        eps_g * z_i, the second tensor_i - eps_g * z_i."""
        if not self.active:
            raise RuntimeError("this paired-mode perturbation was removed; patch the model again")
        if self._active is not None:
            raise RuntimeError("paired perturbations do not nest: a forward is already running")
        mixing = [self._module_names[m] for m in self._batch_norms if m.training]
        if mixing:
            raise PairedModeError(f"paired mode: {mixing[0]!r} is a batch norm in training mode, which mixes the "
                                  "rows of the batch, so the +eps half would see the -eps half; put it in eval "
                                  "mode (fastmezo.patch's default eval_mode=True does) or use mode='exact'")
        self.paths = {}
        self._active = (plan, seed, {id(t): (k, o, float(eps_of_group[g])) for t, k, o, g in
                                     zip(plan.tensors, plan.keys, plan.offsets, plan.groups) if t.numel()})
        try:
            self.copies = ForwardCopies(plan, seed, self._active[2], self._held, self._order)
            # The first forward is checked for reads of a stored weight that bypass its module (exact mode's
            # check).
            self._checker = None if not self._check_reads else _ReadCheck(self, {
                (t.device, t.untyped_storage().data_ptr()): self.names.get(id(t), f"tensor {i}")
                for i, t in enumerate(plan.tensors) if t.numel()})
            with self._checker or contextlib.nullcontext():
                yield
            self._check_reads = False
            if self.copies.asked:            # a replayed CUDA graph asks for nothing
                self._order = self.copies.asked
        finally:
            self._active = self._checker = self._half = self.copies = None

    @contextlib.contextmanager
    def seeded_from(self, words):
        """Within :meth:`perturbation`: the noise of the forwards inside seeded by ``words``, an int32
        tensor of the seed's two words on the device (fastmezo.kernels.axpbz.seed_words), which the
        launches read when they run rather than when they are made: what a CUDA graph captures, so
        that its replay with another step's words in that tensor makes that step's copies
        (fastmezo.paired_graphs)."""
        plan, seed, entries = self._active
        outer = self.copies
        self._active = (plan, words, entries)
        self.copies = ForwardCopies(plan, words, entries, self._held, self._order)
        try:
            yield
            outer.asked = self.copies.asked      # the order of a forward that ran to its end
        finally:
            self._active, self.copies = (plan, seed, entries), outer

    def _read_outside(self, name, func):
        raise PairedModeError(f"paired mode: parameter {name!r} was read by {getattr(func, '__name__', func)}() "
                              "outside the forward of the module that owns it, so that read would see the "
                              "unperturbed weight; call the module instead, or use mode='inplace'")

    # -- the wrapped forwards ----------------------------------------------------------------------
    def _wrap(self, module, forward):
        def paired_forward(*args, **kwargs):
            if self._active is None:
                return forward(*args, **kwargs)
            if self._half is not None:                 # nested in a module running one half
                return self._run_half(module, forward, self._half, args, kwargs)
            # One positional tensor (most modules of a transformer) skips the pytree walks.
            single = len(args) == 1 and not kwargs and type(args[0]) is torch.Tensor and args[0].dim() > 0
            rows = self.rows or (args[0].shape[0] if single else _rows(args, kwargs))
            if rows is None or rows % 2:
                raise PairedModeError(f"paired mode: module {self._module_names[module]!r} got "
                                      f"{'no batched tensor' if rows is None else f'{rows} rows'}; a paired "
                                      "forward runs a doubled batch (an even number of rows along dim 0)")
            out = fused_or_none(self, module, args, kwargs, rows, self.max_rows)
            path = "fused"
            if out is None:
                out, path = materialized_or_none(self, module, args, kwargs, rows), "materialized"
            if out is None:
                out = layer_norm_or_none(self, module, args, kwargs, rows)
            if out is None:
                with _paused(self._checker):      # fastmezo's own reads of the stored weight
                    out, path = self._gathered_or_none(module, args, kwargs, rows), "gathered"
            self.paths[self._module_names[module]] = "materialized" if out is None else path
            if out is not None:
                return out
            if single:
                first, second = ((_half(args[0], rows, True),), {}), ((_half(args[0], rows, False),), {})
                split = first[0][0] is not args[0]
            else:
                first, second = _split(args, kwargs, rows, True), _split(args, kwargs, rows, False)
                split = any(a is not b for a, b in zip(pytree.tree_leaves(first), pytree.tree_leaves((args, kwargs))))
            if not split:
                raise PairedModeError(f"paired mode: no tensor argument of module {self._module_names[module]!r} "
                                      f"has the batch's {rows} rows (or a multiple) along dim 0, so its + and - "
                                      "halves cannot be told apart; paired mode needs batch-first inputs")
            out_plus = self._run_half(module, forward, +1, *first)
            out_minus = self._run_half(module, forward, -1, *second)
            if type(out_plus) is torch.Tensor and type(out_minus) is torch.Tensor and out_plus.dim():
                return torch.cat([out_plus, out_minus])
            return _stack(out_plus, out_minus)
        return paired_forward

    def _run_half(self, module, forward, sign, args, kwargs):
        entries = self._active[2]
        saved, outer = [], self._half
        try:
            names = [n for n in self._owned[module] if id(module._parameters[n]) in entries]
            if names:
                with _paused(self._checker):   # fastmezo's own reads of the stored weights
                    stored = [module._parameters[n] for n in names]
                    copies = self.copies.for_half(module, stored, sign)
                for n, p, copy in zip(names, stored, copies):
                    saved.append((n, p))
                    module._parameters[n] = copy
            self._half = sign
            return forward(*args, **kwargs)
        finally:                               # whatever raised, the stored parameters go back
            self._half = outer
            for n, p in saved:
                module._parameters[n] = p

    def _gathered_or_none(self, module, args, kwargs, rows):
        """A plain nn.Embedding's output with only the looked-up rows perturbed, or None. Row r of the
        weight is elements r*D .. r*D + D - 1 of its stream, so a looked-up row perturbed with that
        offset is exactly the whole weight's perturbed row: on a backend with a rows pass, every looked-up
        row where it lands; otherwise each run of consecutive distinct rows by one tensor of the pair
        pass. A tied use of the weight elsewhere (an lm_head) is its own module call."""
        if type(module).forward is not torch.nn.Embedding.forward or module.max_norm is not None:
            return None
        ids = only_input(args, kwargs)
        weight = module.weight
        entry = self._active[2].get(id(weight))
        if (entry is None or type(ids) is not torch.Tensor or not ids.dim() or ids.shape[0] % rows
                or ids.is_floating_point() or weight.dim() != 2 or ops.tracing()):
            return None
        key, offset, eps = entry
        width = weight.shape[1]
        plan, seed, _ = self._active
        backend = plan.backend_of(weight.device)
        if getattr(backend, "rows_pass", None) is not None and ops.plain([weight, ids]):
            # Every looked-up row (repeats too) perturbed where it lands, its offsets computed on the
            # device: nothing waits for the GPU (torch.unique would, for the number of distinct ids).
            flat = ids.reshape(-1)
            out = torch.nn.functional.embedding(flat, weight.detach())    # the lookup's own index errors
            h = flat.shape[0] // 2
            offsets = flat * width + offset
            backend.rows_pass(out[:h], eps, seed, key, offsets[:h], plan.noise)
            backend.rows_pass(out[h:], -eps, seed, key, offsets[h:], plan.noise)
            return out.view(*ids.shape, width)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        starts, lengths = _runs(uniq.tolist())
        if not starts or starts[0] < 0 or starts[-1] + lengths[-1] > weight.shape[0]:
            return None                        # the materialize path raises the lookup's own error
        table = weight.detach()[uniq]
        h = ids.shape[0] // 2
        n = len(lengths)
        both = torch.empty((2,) + table.shape, dtype=table.dtype, device=table.device)
        self.copies.pair_pass(list(table.split(lengths)), list(both[0].split(lengths)), list(both[1].split(lengths)),
                              [key] * n, [offset + r * width for r in starts], [eps] * n)
        return torch.cat([torch.nn.functional.embedding(inverse[:h], both[0]),
                          torch.nn.functional.embedding(inverse[h:], both[1])])

    def remove(self) -> None:
        """Put the original forwards back. Idempotent."""
        if self._owned is None:
            return
        self._held.clear()
        self._order = []
        for module in self._owned:
            module.__dict__.pop("forward", None)
        self._owned = None


def _runs(sorted_ids):
    """(first id, length) of each run of consecutive ids in a sorted list of distinct ids."""
    starts, lengths = [], []
    for r in sorted_ids:
        if starts and r == starts[-1] + lengths[-1]:
            lengths[-1] += 1
        else:
            starts.append(r)
            lengths.append(1)
    return starts, lengths
