"""The handle of ``fastmezo.patch(model, mode="paired")``: PairedPatch and the paired_patch that builds it.

fastmezo.patching builds every handle; this one extends fastmezo.patch_handle.MeZOPatch. The handle's
``step(batch)`` doubles the batch (fastmezo.paired_batch) and runs it once under the wrapped forwards of
fastmezo.paired.PairedPerturbation, which give the + half W + eps*z and the - half W - eps*z.
"""
from __future__ import annotations

import torch

from .paired import PairedPerturbation
from .paired_batch import _rows, double, half_losses, split_losses
from .paired_graphs import ForwardGraphs
from .patch_handle import MeZOPatch


class PairedPatch(MeZOPatch):
    """Handle of ``fastmezo.patch(model, mode="paired")``: ``step(batch)`` runs the batch doubled, once.

    ``loss_fn(model, doubled_batch)`` returns (l+, l-) or one loss per row; without it a dict batch's
    ``labels`` give the loss of each half (:func:`half_losses`), and on CUDA the forward is captured in a
    CUDA graph and replayed (``cuda_graphs``; fastmezo.paired_graphs, :attr:`graphs`). A closure given
    instead of a batch runs its own paired forward and returns (l+, l-)."""

    def __init__(self, model, optimizer, provider, loss_fn=None, eval_mode: bool = True, cuda_graphs: bool = True):
        super().__init__(model, optimizer, loss_fn=loss_fn, eval_mode=eval_mode, exact=provider)
        self.paired = provider
        self.mode = "paired"
        #: The CUDA graphs of this handle's forwards (None: ``cuda_graphs=False``).
        self.graphs = ForwardGraphs(provider, model) if cuda_graphs else None

    def _closure(self, batch):
        if callable(batch) and not isinstance(batch, torch.nn.Module):
            return lambda: split_losses(batch())
        model, loss_fn, doubled = self.model, self.loss_fn, double(batch)
        if loss_fn is not None:
            rows = _rows(doubled if isinstance(doubled, (tuple, list)) else (doubled,), {})
            return lambda: self._rows_of(rows, lambda: split_losses(loss_fn(model, doubled)))
        if not isinstance(doubled, dict) or "labels" not in doubled:
            raise ValueError("paired mode computes the loss of each half from the batch's 'labels': give a dict "
                             "batch with labels, or fastmezo.patch(model, mode='paired', loss_fn=...)")
        inputs = dict(doubled)
        labels = inputs["labels"]
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            del inputs["labels"]                 # the whole doubled batch's loss is not needed
        forward = lambda inputs, labels: half_losses(model, model(**inputs), labels)      # noqa: E731
        if self.graphs is not None:
            return lambda: self._rows_of(labels.shape[0], lambda: self.graphs.losses(inputs, labels, forward))
        return lambda: self._rows_of(labels.shape[0], lambda: forward(inputs, labels))

    def remove(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        super().remove()

    def _rows_of(self, rows, run):
        self.paired.rows = rows
        try:
            return run()
        finally:
            self.paired.rows = None


def paired_patch(model, groups, *, loss_fn=None, eval_mode=True, fused=None, cuda_graphs=True,
                 **options) -> PairedPatch:
    """The handle of ``fastmezo.patch(model, mode="paired")`` over the param groups ``groups``."""
    from .optim import MeZO
    provider = PairedPerturbation(model, [p for g in groups for _, p in g["params"]], fused=fused)
    try:
        optimizer = MeZO(groups, perturbation=provider, **options)
    except BaseException:
        provider.remove()           # a rejected option leaves no wrapped forward behind
        raise
    return PairedPatch(model, optimizer, provider, loss_fn=loss_fn, eval_mode=eval_mode, cuda_graphs=cuda_graphs)
