"""MeZO inside the Hugging Face Trainer, without copying its loop.

The Trainer keeps its own loop, scheduler, logging, evaluation and checkpoints. fastmezo plugs in
through the Trainer's own mechanisms: the optimizer (``optimizer_cls_and_kwargs=`` or
``optimizers=``) and ``training_step``, which is the only method of the loop overridden here.

    from fastmezo.integrations.transformers import MeZOTrainer, mezo_optimizer_cls_and_kwargs
    args = TrainingArguments(output_dir, learning_rate=1e-6, gradient_accumulation_steps=2, ...)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=ds,
                          optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=1e-3))
    trainer.train()

How a step runs. The Trainer calls ``training_step`` once per micro-batch, then
``optimizer.step()``, then the scheduler. ``training_step`` runs both forwards of one micro-batch
under the step's direction z (+eps, -2 eps, restore: :meth:`fastmezo.MeZO.accumulate`), so the
weights are perturbed only inside it; ``optimizer.step()`` (:class:`MeZOTrainerOptimizer`) applies one update
with g = sum over the micro-batches of (l_plus - l_minus) / (2 eps), each loss scaled as the Trainer
scales the loss it would back-propagate (1 / gradient_accumulation_steps, or normalised by
``num_items_in_batch``), so g estimates the gradient of the accumulated batch's loss. One seed per
optimizer step. Nothing calls ``backward`` and no ``.grad`` is allocated. Evaluation and
checkpoints, which the Trainer runs between optimizer steps, see unperturbed weights.

Logs: ``loss`` is the mean of l_plus and l_minus (what ``training_step`` returns, scaled like the
Trainer's own loss); ``projected_grad`` is the latest step's projected gradient (first param group)
and ``projected_grad_abs_mean`` the mean of |g| over the steps since the previous log. The
Trainer's ``grad_norm`` is dropped from the logs: there are no gradients to measure.

Trajectory-only checkpoints: ``MeZOTrainer(..., save_trajectory_only=True)`` saves, at every checkpoint
(and ``save_model``), the run's trajectory (``mezo_trajectory.jsonl``: the base weights' sha256 and a
few numbers per step, fastmezo.trajectory) instead of the weights. ``train(resume_from_checkpoint=...)``
on a model holding the base weights replays it (fastmezo.replay: the same weights bit for bit) and
continues; ``python -m fastmezo replay BASE CHECKPOINT/mezo_trajectory.jsonl OUT`` writes the weights.

Data parallel (torchrun, docs/distributed.md): when torch.distributed is initialized with more than
one process, the first training step makes the optimizer data parallel (:func:`fastmezo.data_parallel`):
every micro-batch's two losses are averaged over the ranks in one all-reduce, so every rank applies
the same update and the replicas stay bit-identical; a rank whose loss is non-finite or whose forward
raises makes every rank skip together. The Trainer wraps a plain model in DDP itself (no gradient
hook fires: there is no backward). An FSDP2 model (``fully_shard`` applied by the caller before
``mezo_optimizer_cls_and_kwargs``) is trained shard by shard and not wrapped in DDP; its checkpoints
hold the gathered weights, written by the main process. Checkpoints are written once (``should_save``).

Cost: three memory passes per micro-batch plus one for the update (``MeZO.step`` fuses the
restore into the update, three in all; here the restore stays inside ``training_step`` so that no
one ever sees perturbed weights).

Where the code lives: fastmezo.integrations.trainer_optimizer holds the optimizer (MeZOTrainerOptimizer,
mezo_optimizer_cls_and_kwargs; it needs no transformers), fastmezo.integrations.trainer_mixin the
Trainer side (MeZOTrainerMixin: training_step, data parallel, checkpoints, logs). This module is the
public import path: it re-exports them (and TRAJECTORY_FILE) and defines MeZOTrainer.
"""
from __future__ import annotations

from transformers import Trainer

from .trainer_mixin import TRAJECTORY_FILE, MeZOTrainerMixin  # noqa: F401  (TRAJECTORY_FILE: public here too)
from .trainer_optimizer import MeZOTrainerOptimizer, mezo_optimizer_cls_and_kwargs

__all__ = ["MeZOTrainerOptimizer", "MeZOTrainerMixin", "MeZOTrainer", "mezo_optimizer_cls_and_kwargs"]


class MeZOTrainer(MeZOTrainerMixin, Trainer):
    """``transformers.Trainer`` trained with MeZO (see :class:`MeZOTrainerMixin` and the module
    docstring). Build it like a Trainer, with
    ``optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=...)``."""
