"""Exact mode: the perturbed weights W + alpha * z are materialized per module (or per group of
modules), right before the module uses them, so the STORED weights change only at the update
(docs/design.md, strategies of a step).

In-place MeZO writes theta + eps z, then theta - eps z, then theta back into the stored weights; in
float16/bfloat16 each of those writes rounds, and the rounding errors of the restore pile up step after
step (docs/perf.md has the drift measured over null steps). Exact mode never
writes a perturbed value into a stored weight: a forward pre-hook computes the perturbed copies
(:func:`fastmezo.functional.perturbed`, one read of W, one write of the copy, rounded to nearest: it
is a temporary) and swaps them in; a forward hook swaps the stored parameters back and the copies are
freed. One step is then two forwards and ONE update pass

    theta <- (1 - lr * wd) * theta - lr * g * z

(:func:`fastmezo.functional.update_`), so a step with lr = 0 leaves the weights bit-identical.

Groups (fastmezo.exact_groups, which says why): the hooks sit on the largest modules whose trained
parameters take at most ``group_bytes`` (default: the largest trained tensor, at least
``MIN_GROUP_BYTES``), e.g. one decoder layer of an OPT model; ``group_bytes=0`` hooks every module
that owns a trained parameter, for its own ones.

Cost and memory: the same number of passes over the weights as in-place mode (two out-of-place, one
update), plus a little Python per hooked module and forward. Extra memory is the perturbed copies that
are alive at once: those of the hooked modules whose forward is running, at most ``group_bytes`` for
a group (a parameter owned by a module above the budget, e.g. the root, stays materialized for that
module's whole forward). :attr:`ExactPerturbation.peak_bytes` records the peak.

Which module reads which parameter: a parameter is "owned" by every module holding it in its own
``_parameters`` (``named_parameters(recurse=False)``); a tied weight (embedding and lm_head) has two
owners and is materialized in each (once in a group holding both), with the same key, so it gets the
same z wherever it is used, and it is updated once (it is one tensor of the optimizer). A forward that
reads a parameter outside the forward of the hooked module covering it (a parent's forward reading
``self.child.weight`` when the parent is above the budget, a loss adding ``p.pow(2).sum()``, a call of
``module.forward`` that bypasses hooks) would see the unperturbed weight: the first perturbed forward
after patching runs under a checker (fastmezo.exact_read_check) that raises :class:`ExactModeError`
naming the parameter if a stored trained parameter (or a view of it) reaches any torch function
during a forward.

The interface with the step engine (fastmezo.engine.Exact; ``MeZO(..., perturbation=provider)``) is
two methods:

    provider.covered(tensors) -> list of the indices of tensors it cannot materialize
    provider.perturbation(plan, seed, alpha_of_group) -> context manager

Inside the context every forward sees tensor i of the plan (fastmezo.plan.Plan) as
tensor_i + alpha_of_group[g_i] * z(seed, key_i) with the plan's noise and backends; outside, the model
is the plain model (evaluation between steps sees the stored weights).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from . import ops
from .exact_groups import MIN_GROUP_BYTES, _Layout, plan_groups
from .exact_read_check import _ReadCheck

__all__ = ["ExactPerturbation", "ExactModeError"]

# Modules hooked by a live ExactPerturbation: a second exact patch over any of them is refused (the
# two would swap each other's tensors). Weak, so a dropped model is not kept alive by fastmezo.
_HOOKED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


class ExactModeError(RuntimeError):
    """A model cannot run in exact mode as it is (a parameter is read outside its module's forward,
    or a module is already patched)."""


class _Active:
    """The perturbation of the forwards running now: per stored tensor (by id), its key and alpha."""

    def __init__(self, plan, seed, entries):
        self.plan, self.seed, self.entries = plan, seed, entries


class ExactPerturbation:
    """Perturbation provider of exact mode: hooks on the modules that cover the given parameters.

    ``ExactPerturbation(model, params)`` installs a forward pre-hook and a forward hook (always
    called, also when the forward raises) on each module of :func:`plan_groups` for ``params``
    (default: the model's trainable parameters) and ``group_bytes`` (default None: the largest of
    ``params``, at least :data:`MIN_GROUP_BYTES`; 0: every owning module for itself); ``groups``
    holds the plan. Nothing else of the model changes: no attribute, class, forward or parameter.
    :meth:`remove` takes the hooks off again. ``check_reads``: check the first perturbed forward for
    reads that bypass the hooks (see the module docstring).

    Statistics (for tests and memory reports): ``materialized`` counts perturbed copies made,
    ``live_tensors``/``live_bytes`` are the copies alive now, ``peak_tensors``/``peak_bytes`` the most
    alive at once since construction (or :meth:`reset_peak`).
    """

    def __init__(self, model: torch.nn.Module, params=None, *, check_reads: bool = True,
                 group_bytes: int | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ExactPerturbation takes a torch.nn.Module, not {type(model).__name__}")
        if group_bytes is not None and (isinstance(group_bytes, bool) or not isinstance(group_bytes, int)
                                        or group_bytes < 0):
            raise ValueError(f"group_bytes must be None (automatic) or an int >= 0, got {group_bytes!r}")
        params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
        names = {}
        for name, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), name)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or id(p) not in names:
                raise ValueError(f"parameter {i} of exact mode is not a parameter of this model: exact mode "
                                 "materializes only parameters that modules of the model own")
        wanted = {id(p) for p in params}
        # Owners: every (module, attribute) that holds a wanted parameter in its own _parameters, tied
        # weights included (remove_duplicate=False lists each holder).
        owned: dict[torch.nn.Module, list[str]] = {}
        module_names = {}
        for mname, module in model.named_modules(remove_duplicate=True):
            module_names[module] = mname
            for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
                if id(p) in wanted:
                    owned.setdefault(module, []).append(pname)
        clash = [module_names[m] or type(m).__name__ for m in owned if m in _HOOKED]
        if clash:
            raise ExactModeError(f"module {clash[0]!r} is already patched in exact mode by another fastmezo "
                                 "patch; remove that patch first")
        if group_bytes is None:
            largest = max((p.numel() * p.element_size() for p in params), default=0)
            group_bytes = max(largest, MIN_GROUP_BYTES)
        self.model = model
        self.group_bytes = group_bytes
        self.names = {pid: names[pid] for pid in wanted}    # id(parameter) -> its (first) name
        self._owned = owned
        self._module_names = module_names
        #: hooked module -> the (owner module, attribute) pairs its hooks materialize (see plan_groups)
        self.groups = plan_groups(model, owned, group_bytes)
        self._where: dict[str, list[str]] = {}     # parameter name -> names of the hooked modules covering it
        for hooked, members in self.groups.items():
            for owner, pname in members:
                where = self._where.setdefault(names[id(owner._parameters[pname])], [])
                label = module_names[hooked] or "<root>"
                if label not in where:
                    where.append(label)
        self._check_reads = bool(check_reads)
        self._active: _Active | None = None
        # id(hooked) -> (module, [(owner, attribute, stored)], copies, bytes of the copies)
        self._swapped: dict[int, tuple[torch.nn.Module, list, int, int]] = {}
        self._depth: dict[int, int] = {}
        self._layouts: dict[int, _Layout] = {}      # id(hooked module) -> its copies' layout
        self._checker: _ReadCheck | None = None
        self.materialized = 0
        self.live_tensors = self.live_bytes = 0
        self.peak_tensors = self.peak_bytes = 0
        self._handles = []
        for module in self.groups:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook, prepend=True))
            self._handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        for module in owned:
            _HOOKED.add(module)

    # -- the provider interface used by fastmezo.MeZO -------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether the hooks are installed (False after :meth:`remove`)."""
        return self._handles is not None

    def covered(self, tensors) -> list[int]:
        """Indices of ``tensors`` this provider cannot materialize (not among its parameters)."""
        return [i for i, t in enumerate(tensors) if id(t) not in self.names]

    @contextlib.contextmanager
    def perturbation(self, plan, seed: int, alpha_of_group):
        """Forwards inside the context see tensor i of ``plan`` (a fastmezo.plan.Plan, validated) as
        tensor_i + alpha_of_group[g_i] * z(seed, key_i), with the plan's noise, rounded to nearest; the
        stored tensors are only read."""
        if not self.active:
            raise RuntimeError("this exact-mode perturbation was removed; patch the model again")
        if self._active is not None:
            raise RuntimeError("exact-mode perturbations do not nest: a forward is already perturbed")
        entries = {id(t): (k, float(alpha_of_group[g])) for t, k, g in zip(plan.tensors, plan.keys, plan.groups)
                   if t.numel()}
        self._active = _Active(plan, seed, entries)
        checker = None
        if self._check_reads:
            storages = {(t.device, t.untyped_storage().data_ptr()): self.names.get(id(t), f"tensor {i}")
                        for i, t in enumerate(plan.tensors) if t.numel()}
            checker = self._checker = _ReadCheck(self, storages)
        try:
            if checker is not None:
                with checker:
                    yield
                self._check_reads = False      # one clean forward was checked
            else:
                yield
        finally:
            self._checker = None
            self._active = None
            # A hook that did not run (a forward interrupted between hooks) must not leave a perturbed
            # copy in a module: put every stored parameter back.
            for module, saved in list(self._swapped.values()):
                self._restore(module, saved)
            self._swapped.clear()
            self._depth.clear()

    # -- hooks ------------------------------------------------------------------------------------
    def _pre_hook(self, module, args):
        active = self._active
        if active is None:
            return None
        key = id(module)
        depth = self._depth.get(key, 0)
        self._depth[key] = depth + 1
        if depth:                          # re-entrant call: the copies are already in place
            return None
        entries = active.entries
        slots, stored, keys, alphas, index = [], [], [], [], {}
        for owner, pname in self.groups[module]:
            p = owner._parameters[pname]
            pid = id(p)
            i = index.get(pid)
            if i is None:
                entry = entries.get(pid)
                if entry is None:
                    continue
                i = index[pid] = len(stored)     # a tied weight in two owners of a group: one copy
                stored.append(p)
                keys.append(entry[0])
                alphas.append(entry[1])
            slots.append((owner, pname, p, i))
        if not stored:
            return None
        if self._checker is not None:
            self._checker.paused += 1
        try:
            # Round to nearest: the copy is a temporary, the stored weight keeps its exact value.
            # Straight to the fused pass (one launch for the whole group): the tensors were validated
            # when the step began, and this runs once per hooked module and forward.
            layout = self._layouts.get(key)
            if layout is None or not layout.fits(stored):
                layout = self._layouts[key] = _Layout(stored)
            copies = layout.carve()
            plan = active.plan
            ops.run(plan.backend_of(stored[0].device), stored, copies, layout.ones, alphas, active.seed, keys,
                    layout.zeros, plan.noise)
        finally:
            if self._checker is not None:
                self._checker.paused -= 1
        saved = []
        for owner, pname, p, i in slots:
            # A plain dict write: nn.Module.__getattr__ returns it as owner.<pname> during the forward.
            owner._parameters[pname] = copies[i]
            saved.append((owner, pname, p))
        nbytes = layout.nbytes                 # the copies' own bytes, without the alignment padding
        self._swapped[key] = (module, saved, len(copies), nbytes)
        self.materialized += len(copies)
        self.live_tensors += len(copies)
        self.live_bytes += nbytes
        self.peak_tensors = max(self.peak_tensors, self.live_tensors)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return None

    def _post_hook(self, module, args, output):
        key = id(module)
        depth = self._depth.get(key)
        if depth is None:
            return None
        if depth > 1:
            self._depth[key] = depth - 1
            return None
        del self._depth[key]
        swapped = self._swapped.pop(key, None)
        if swapped is not None:
            self._restore(*swapped)
        return None

    def _restore(self, module, saved, ntensors, nbytes):
        for owner, pname, p in saved:
            owner._parameters[pname] = p
        self.live_tensors -= ntensors
        self.live_bytes -= nbytes

    def _read_outside(self, name, func):
        inside = [self._module_names.get(m) or "<root>" for m, *_ in self._swapped.values()]
        where = f" inside the forward of {inside[-1]!r}" if inside else ""
        covering = self._where.get(name) or ["its module"]
        raise ExactModeError(
            f"exact mode: parameter {name!r} was read by {getattr(func, '__name__', func)}(){where}, outside "
            f"the forward of {', '.join(repr(o) for o in covering)}, where exact mode materializes it "
            f"(group_bytes={self.group_bytes}). Exact mode swaps W + eps*z in only for the forward of that "
            "module, so this read would see the unperturbed weight and the gradient estimate would be wrong. "
            "Call the submodule instead of reading its weight, give exact mode a group_bytes large enough "
            "to hold the whole reading module's trained parameters, leave this parameter out of training "
            "(requires_grad=False), or use mode='inplace'.")

    def reset_peak(self) -> None:
        """Start a new measurement of ``peak_tensors`` / ``peak_bytes``."""
        self.peak_tensors, self.peak_bytes = self.live_tensors, self.live_bytes

    def remove(self) -> None:
        """Take the hooks off; the modules are as they were. Idempotent."""
        if self._handles is None:
            return
        for handle in self._handles:
            handle.remove()
        for module in self._owned:
            _HOOKED.discard(module)
        self._layouts.clear()                      # they hold the stored tensors
        self._handles = None
