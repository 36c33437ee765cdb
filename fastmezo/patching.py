"""fastmezo.patch(model): bind a MeZO optimizer to a model's trainable parameters.

    handle = fastmezo.patch(model, lr=1e-6, eps=1e-3)
    for batch in loader:
        loss = model.mezo_step(batch)      # or handle.step(batch), or handle.step(closure)
    handle.remove()                        # the model is as it was (weights aside)

Only the instance is changed (one attribute, ``mezo_step``); the class and other instances are not.

Two modes:
  * ``mode="inplace"`` (default, fastest): the +eps and -2 eps passes write the perturbed weights into
    the stored parameters, the update pass restores and updates them.
  * ``mode="exact"``: forward hooks materialize W + eps z right before a module (a group of modules,
    e.g. a decoder layer, of at most ``group_bytes``) runs and put the stored parameters back after it
    (fastmezo.exact); the stored weights change only at the update, so float16/bfloat16 weights do
    not drift.
  * ``mode="paired"``: both perturbed forwards in ONE forward over the batch stacked twice, the first
    half seeing W + eps z, the second W - eps z, in every module owning a trained parameter; the stored
    weights change only at the update, as in exact mode (fastmezo.paired).
"""
from __future__ import annotations

import torch

from .engine import NO_DECAY
from .exact import ExactPerturbation
from .optim import MeZO, param_groups
from .paired_patch import paired_patch
from .patch_handle import _ATTRIBUTE, _HANDLE, MeZOPatch

MODES = ("inplace", "exact", "paired")


def patch(model: torch.nn.Module, *, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
          seed: int = 0, noise: str = "gaussian", loss_fn=None, eval_mode: bool = True,
          keys: str = "auto", no_decay=NO_DECAY, mode: str = "inplace",
          group_bytes: int | None = None, fused=None, cuda_graphs: bool | None = None,
          **optimizer_options) -> MeZOPatch:
    """Bind MeZO to the trainable (requires_grad) parameters of ``model``; returns a :class:`MeZOPatch`.

    Weight decay skips bias and normalization parameters (the reference's rule, see
    :func:`fastmezo.param_groups`). Noise keys come from parameter names by default, so they do not
    change when the model is wrapped. ``loss_fn(model, batch)`` replaces the default loss (the
    output's ``.loss``). Other keyword arguments go to :class:`fastmezo.MeZO`. Patching a patched
    model raises; remove the first patch first.

    ``mode``: "inplace" (default, fastest), "exact" (perturbed weights materialized per group of
    modules, the stored weights written only by the update; see fastmezo.exact) or "paired" (both
    forwards in one over the doubled batch, see fastmezo.paired; ``loss_fn(model, doubled_batch)``
    then returns (l+, l-) or one loss per row). In exact mode the
    first step checks that every trained parameter is read only inside the forward of the hooked
    module covering it and raises fastmezo.exact.ExactModeError otherwise (e.g. a parent's forward
    reading a child's weight, where the parent is above the group budget).
    ``group_bytes`` (exact mode only): the most bytes of perturbed copies one hooked module
    materializes at once (fastmezo.exact_groups.plan_groups; default: the largest trained tensor, at least
    16 MiB; 0: one hooked module per module owning a trained parameter).
    ``fused`` (paired mode only): when an nn.Linear runs paired mode's fused kernel rather than
    materialized copies: None (automatic: the Hopper kernel up to one block of rows a half), a number
    of rows, True or False (fastmezo.paired_linear).
    ``cuda_graphs`` (paired mode only; default True): on CUDA, the paired forward of a batch with labels
    is captured once per batch shape and replayed (fastmezo.paired_graphs); False runs it eagerly.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastmezo.patch takes a torch.nn.Module, not {type(model).__name__}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown fastmezo.patch mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")
    if group_bytes is not None and mode != "exact":
        raise ValueError("group_bytes applies to mode='exact' only (in-place mode materializes nothing)")
    if fused is not None and mode != "paired":
        raise ValueError("fused applies to mode='paired' only")
    if cuda_graphs is not None and mode != "paired":
        raise ValueError("cuda_graphs applies to mode='paired' only")
    if "perturbation" in optimizer_options:
        raise TypeError("fastmezo.patch chooses the perturbation from mode='inplace'|'exact'; do not pass "
                        "perturbation= as well")
    if _HANDLE in model.__dict__:
        raise RuntimeError("this model is already patched by fastmezo; call remove() on the existing "
                           "handle (model._fastmezo_patch) before patching again")
    if _ATTRIBUTE in model.__dict__ or hasattr(type(model), _ATTRIBUTE):
        raise RuntimeError(f"the model already has an attribute {_ATTRIBUTE!r}; fastmezo will not replace it")
    groups = param_groups(model, weight_decay, no_decay=no_decay)
    if mode == "paired":
        handle = paired_patch(model, groups, lr=lr, eps=eps, seed=seed, noise=noise, keys=keys, loss_fn=loss_fn,
                              eval_mode=eval_mode, fused=fused, cuda_graphs=cuda_graphs is not False,
                              **optimizer_options)
        object.__setattr__(model, _HANDLE, handle)
        object.__setattr__(model, _ATTRIBUTE, handle.step)
        return handle
    exact = None
    if mode == "exact":
        exact = ExactPerturbation(model, [p for g in groups for _, p in g["params"]], group_bytes=group_bytes)
        optimizer_options["perturbation"] = exact
    try:
        optimizer = MeZO(groups, lr=lr, eps=eps, seed=seed, noise=noise, keys=keys, **optimizer_options)
    except BaseException:
        if exact is not None:
            exact.remove()      # a rejected option leaves no hook behind
        raise
    handle = MeZOPatch(model, optimizer, loss_fn=loss_fn, eval_mode=eval_mode, exact=exact)
    # Instance attributes only: nn.Module.__setattr__ stores plain callables in __dict__.
    object.__setattr__(model, _HANDLE, handle)
    object.__setattr__(model, _ATTRIBUTE, handle.step)
    return handle
