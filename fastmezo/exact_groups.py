"""Exact mode's groups: which hooked module materializes which trained parameters
(:func:`plan_groups`, :data:`MIN_GROUP_BYTES`) and where the perturbed copies of one group lie
(:class:`_Layout`).

Apart from the hooks (fastmezo.exact.ExactPerturbation) because this is bookkeeping over the module
tree and the tensors' shapes, decided once per patch (or per group when its tensors move): it reads no
perturbation state, launches nothing and can be read and tested on its own.

Why groups: the hooks sit on the largest modules whose trained parameters take at most ``budget`` bytes,
e.g. one decoder layer of an OPT model, whose copies are then made in one launch, before the layer runs:
a hook per decoder layer instead of one per Linear / LayerNorm / Embedding module, because exact mode's
cost on a model of many small modules was host time, a Python hook and a kernel launch per module.
"""
from __future__ import annotations

import torch

__all__ = ["plan_groups", "MIN_GROUP_BYTES"]


#: Smallest automatic group budget (see :func:`plan_groups`): models whose trained tensors are all
#: small (LoRA, prefixes, norms) are materialized in a few launches rather than one per module.
MIN_GROUP_BYTES = 16 << 20


def plan_groups(model: torch.nn.Module, owned: dict, budget: int) -> dict:
    """Which module's hooks materialize which trained parameters: {hooked module: [(owner, attribute)]}.

    Walking down from the root, a module whose subtree's trained parameters take at most ``budget``
    bytes (a tied weight counted once) becomes one group: its pre-hook materializes all of them in
    one launch and its forward hook puts them all back, so the modules inside run without hooks of
    their own. Per forward that is a few hooks and launches per transformer block instead of one
    per Linear / LayerNorm: the host time that made exact mode slow on models of many small modules.
    A module is grouped only if its subtree is closed (no module in it is reachable by a second
    path from the root, e.g. a layer shared with another part of the model, which could be called
    outside the group's forward); otherwise, or above the budget, the walk goes down to its
    children, and a module owning trained parameters itself gets hooks for its own. ``budget`` 0
    gives one group per owning module (each module's own parameters).
    """
    paths = {}
    for _, module in model.named_modules(remove_duplicate=False):
        paths[id(module)] = paths.get(id(module), 0) + 1

    def subtree(module):
        members = [(module, pname) for pname in owned.get(module, ())]
        closed = paths[id(module)] == 1
        for child in module.children():
            child_members, child_closed = subtree(child)
            members += child_members
            closed = closed and child_closed
        return members, closed

    def nbytes(members):
        unique = {id(o._parameters[n]): o._parameters[n] for o, n in members}
        return sum(p.numel() * p.element_size() for p in unique.values())

    plan: dict = {}
    seen: set = set()

    def visit(module):
        if id(module) in seen:
            return
        seen.add(id(module))
        members, closed = subtree(module)
        if not members:
            return
        if closed and nbytes(members) <= budget:
            plan[module] = members
            return
        own = [(module, pname) for pname in owned.get(module, ())]
        if own:
            plan[module] = own
        for child in module.children():
            visit(child)

    visit(model)
    return plan


class _Layout:
    """Where the perturbed copies of one group lie: one buffer per dtype, each copy at a multiple of
    64 bytes. One allocation per group rather than one per tensor, and a layout that is the same at
    every forward: the Triton launcher's table of a group (which records where each copy lies
    relative to the first) is then found in its cache instead of being built and uploaded again each
    time the caching allocator hands out another address. Computed once per group; the hooks reuse it
    while the group's stored tensors are the same objects at the same addresses (:meth:`fits`: a
    ``model.to(...)`` or ``.half()`` after patching keeps the Parameter objects but moves their data,
    and the copies must follow). It holds the tensors, so their ids stay theirs."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = list(tensors)
        self.key = tuple((id(t), t.data_ptr()) for t in tensors)
        self.n = len(tensors)
        self.ones, self.zeros = [1.0] * self.n, [0] * self.n
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)
        by_dtype: dict = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        self.buffers = []                  # (dtype, device, elements, [(index, shape, strides, start)])
        for dtype, idx in by_dtype.items():
            first = tensors[idx[0]]
            align = max(1, 64 // first.element_size())
            views, total = [], 0
            for i in idx:
                t = tensors[i]
                views.append((i, tuple(t.shape), t.stride(), total))    # t is contiguous (validated)
                total += -(-t.numel() // align) * align
            self.buffers.append((dtype, first.device, total, views))

    def fits(self, tensors: list[torch.Tensor]) -> bool:
        """Whether this layout is the one of ``tensors`` (same objects, same data)."""
        return len(tensors) == self.n and all(id(t) == i and t.data_ptr() == ptr
                                              for t, (i, ptr) in zip(tensors, self.key))

    def carve(self) -> list[torch.Tensor]:
        """Uninitialized contiguous tensors shaped like the group's tensors, in their order."""
        out: list = [None] * self.n
        for dtype, device, total, views in self.buffers:
            buf = torch.empty(total, dtype=dtype, device=device)
            for i, shape, strides, start in views:
                out[i] = buf.as_strided(shape, strides, start)
        return out
