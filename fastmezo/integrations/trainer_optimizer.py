"""The optimizer that a training loop steps without a closure, as the Hugging Face Trainer does.

:class:`MeZOTrainerOptimizer` is a :class:`fastmezo.MeZO` whose ``step()`` applies the micro-batch
estimates that ``accumulate(closure)`` added; :func:`mezo_optimizer_cls_and_kwargs` builds its
arguments for ``Trainer(optimizer_cls_and_kwargs=...)``. They are apart from the Trainer subclass
(fastmezo.integrations.trainer_mixin) because neither needs transformers: any loop that calls
``accumulate`` per micro-batch and ``step()`` after them can use the optimizer. Users import both
from fastmezo.integrations.transformers, whose docstring describes how a step runs.
"""
from __future__ import annotations

import torch

from ..optim import MeZO, param_groups

__all__ = ["MeZOTrainerOptimizer", "mezo_optimizer_cls_and_kwargs"]


class MeZOTrainerOptimizer(MeZO):
    """:class:`fastmezo.MeZO` that a training loop steps without a closure, as the Trainer does.

    ``step()`` applies the micro-batch estimates that ``accumulate(closure)`` added since the last
    step (:meth:`fastmezo.MeZO.step_accumulated`); ``step(closure)`` is MeZO's ordinary one-batch
    step. Same arguments as :class:`fastmezo.MeZO`. The projected gradient of every step is kept in
    ``unlogged_projected_grads`` until :class:`MeZOTrainerMixin` logs it.
    """

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.unlogged_projected_grads: list[float] = []

    def step(self, closure=None):
        """Apply the accumulated micro-batch estimates (no closure), or run ``MeZO.step(closure)``."""
        if closure is not None:
            return super().step(closure)
        if self.pending_micro_batches == 0:
            raise ValueError("MeZOTrainerOptimizer.step() found no micro-batch estimates: the training loop must "
                             "call accumulate(closure) for each micro-batch (MeZOTrainer.training_step does; "
                             "a plain transformers.Trainer calls backward instead)")
        loss = self.step_accumulated()
        self.unlogged_projected_grads.append(self.projected_grad)
        return loss


def mezo_optimizer_cls_and_kwargs(model: torch.nn.Module, args=None, *, lr: float | None = None,
                                  eps: float = 1e-3, weight_decay: float | None = None,
                                  seed: int | None = None, keys: str = "auto", **options):
    """``(MeZOTrainerOptimizer, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, over the trainable
    (requires_grad) parameters of ``model``.

    lr, weight_decay and seed default to ``args.learning_rate``, ``args.weight_decay`` and
    ``args.seed`` of the TrainingArguments ``args`` (the Trainer does not pass them to an optimizer
    given this way). Weight decay skips bias and normalization parameters
    (:func:`fastmezo.param_groups`). Noise keys come from parameter names by default, with wrapper
    prefixes (PEFT's ``base_model.model.``, DDP's ``module.``) removed, so a run does not depend on
    wrapping. Other keyword arguments go to :class:`fastmezo.MeZO`. The arguments are checked here,
    so bad ones fail before the Trainer is built. The Trainer pops the ``params`` entry when it
    builds the optimizer: give each Trainer its own tuple.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"mezo_optimizer_cls_and_kwargs takes the model (a torch.nn.Module), "
                        f"not {type(model).__name__}")
    if lr is None:
        if args is None:
            raise ValueError("give the learning rate: lr=... or the TrainingArguments (args.learning_rate)")
        lr = args.learning_rate
    if weight_decay is None:
        weight_decay = getattr(args, "weight_decay", 0.0) or 0.0
    if seed is None:
        seed = getattr(args, "seed", 0) if args is not None else 0
    groups = param_groups(model, weight_decay)  # raises if nothing is trainable
    kwargs = dict(lr=lr, eps=eps, seed=seed, keys=keys, **options)
    MeZOTrainerOptimizer(groups, **kwargs)  # validates every argument now; the Trainer builds its own later
    return MeZOTrainerOptimizer, dict(params=groups, **kwargs)

