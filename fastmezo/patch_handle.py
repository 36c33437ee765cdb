"""The handle of a patched model (:class:`MeZOPatch`): ``step`` on a batch or a closure, eval-mode
forwards, ``remove()``. Apart from :mod:`fastmezo.patching` (which builds handles) so that paired
mode's handle (:mod:`fastmezo.paired_patch`) can build on it without importing the builder.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .exact import ExactPerturbation
from .optim import MeZO

_ATTRIBUTE = "mezo_step"
_HANDLE = "_fastmezo_patch"


def _loss_from_output(output):
    if isinstance(output, torch.Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model's output has no .loss: put the labels in the batch, or give "
                         "fastmezo.patch(model, loss_fn=lambda model, batch: ...)")
    return loss


class MeZOPatch:
    """Handle of a patched model: ``step``, ``optimizer``, ``remove()``; also a context manager that
    removes the patch on exit."""

    def __init__(self, model: torch.nn.Module, optimizer: MeZO, loss_fn=None, eval_mode: bool = True,
                 exact: ExactPerturbation | None = None):
        self.model = model
        self.optimizer = optimizer
        #: The exact-mode hooks (fastmezo.exact.ExactPerturbation), or None in in-place mode.
        self.exact = exact
        self.mode = "inplace" if exact is None else "exact"
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self.active = True

    def _closure(self, batch):
        if callable(batch) and not isinstance(batch, torch.nn.Module):
            return batch
        model, loss_fn = self.model, self.loss_fn
        if loss_fn is not None:
            return lambda: loss_fn(model, batch)
        if isinstance(batch, Mapping):
            return lambda: _loss_from_output(model(**batch))
        if isinstance(batch, (tuple, list)):
            return lambda: _loss_from_output(model(*batch))
        if isinstance(batch, torch.Tensor):
            return lambda: _loss_from_output(model(batch))
        raise TypeError(f"mezo_step takes a batch (dict, tuple, list or tensor) or a closure, "
                        f"not {type(batch).__name__}")

    def step(self, batch):
        """One MeZO step on ``batch`` (forwarded as model(**batch), model(*batch) or model(batch),
        the loss read from the output's ``.loss``) or on a closure that returns the loss.
        The two forwards run without autograd and, by default, in eval mode (dropout off, as the
        paper does); every module's train/eval flag is put back afterwards. Returns the loss at
        theta + eps * z."""
        if not self.active:
            raise RuntimeError("this fastmezo patch was removed; patch the model again to train")
        closure = self._closure(batch)
        modes = [(m, m.training) for m in self.model.modules()] if self.eval_mode else []
        if any(training for _, training in modes):     # (a walk over every module: only when one trains)
            self.model.eval()
        try:
            return self.optimizer.step(closure)
        finally:
            for module, training in modes:
                module.training = training

    __call__ = step

    def remove(self) -> None:
        """Undo the patch: the model loses ``mezo_step`` (and, in exact mode, its hooks) and can be
        patched again. Idempotent."""
        if not self.active:
            return
        self.active = False
        if self.exact is not None:
            self.exact.remove()
        for name in (_ATTRIBUTE, _HANDLE):
            if name in self.model.__dict__:
                delattr(self.model, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
