"""MeZOTrainerMixin: the Trainer side of fastmezo.integrations.transformers (read its docstring first).

The mixin overrides the few Trainer methods MeZO needs: ``training_step`` (both forwards of a
micro-batch under z, no backward), ``log`` (the projected gradient instead of a gradient norm), and the
checkpoint hooks ``_save`` / ``_load_from_checkpoint`` (trajectory-only checkpoints; FSDP2 models
gathered on save, re-sharded on load). On several processes its first training step makes the
optimizer data parallel (fastmezo.distributed). It is apart from the optimizer it drives
(fastmezo.integrations.trainer_optimizer, which needs no transformers) and from the public module,
which re-exports it and defines MeZOTrainer = MeZOTrainerMixin + Trainer.
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
from transformers import Trainer

from ..optim import MeZO
from ..plan import _is_dtensor
from ..replayer import replay
from ..trajectory import Trajectory
from .trainer_optimizer import MeZOTrainerOptimizer

#: The file of a trajectory-only checkpoint (MeZOTrainer(save_trajectory_only=True)).
TRAJECTORY_FILE = "mezo_trajectory.jsonl"

__all__ = ["MeZOTrainerMixin", "TRAJECTORY_FILE"]


def _unwrap(optimizer):
    """The optimizer under accelerate's AcceleratedOptimizer (and similar wrappers)."""
    while optimizer is not None and not isinstance(optimizer, MeZO) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class MeZOTrainerMixin:
    """Mixin that trains a ``transformers.Trainer`` subclass with MeZO: put it first,
    ``class MySFT(MeZOTrainerMixin, SFTTrainer)``. Overrides ``training_step`` (and ``log``, to add
    the projected gradient). The optimizer must be a :class:`MeZOTrainerOptimizer`, given through
    ``optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args)`` or
    ``optimizers=(MeZOTrainerOptimizer(...), scheduler_or_None)``.

    ``mezo_eval_mode`` (class attribute, default True): both forwards of a micro-batch run in eval
    mode (dropout off, as in the paper), so that l_plus and l_minus differ only by the perturbation;
    every module's train/eval flag is put back afterwards.
    """

    mezo_eval_mode = True
    #: With several processes: compare the replicas' checksums every that many optimizer steps
    #: (:func:`fastmezo.data_parallel`'s ``check_every``); None: never.
    mezo_check_every = None

    def __init__(self, *args, save_trajectory_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        #: The :class:`fastmezo.distributed.DataParallel` handle once training runs on several processes.
        self.mezo_data_parallel = None
        if _sharded(getattr(self, "model", None)):
            if not hasattr(self, "is_distributed_loading_by_transformers"):
                raise RuntimeError("this transformers version cannot train a model the caller sharded with "
                                   "fully_shard (its Trainer would wrap the DTensor parameters in DDP)")
            if save_trajectory_only:
                raise ValueError("save_trajectory_only does not support FSDP2 (DTensor) parameters: the "
                                 "trajectory's base hash is taken over whole tensors; save weights instead")
            # The Trainer's flag for a model that owns its sharding: accelerate must not wrap it in DDP
            # (which cannot broadcast DTensors), and every rank joins the gathers of a checkpoint.
            self.is_distributed_loading_by_transformers = True
        if not isinstance(save_trajectory_only, bool):
            raise TypeError(f"save_trajectory_only must be True or False, got {save_trajectory_only!r}")
        if save_trajectory_only and self.args.load_best_model_at_end:
            raise ValueError("save_trajectory_only=True saves no weights, so load_best_model_at_end cannot load "
                             "them; replay the best checkpoint's trajectory instead (fastmezo.replay)")
        #: Checkpoints hold the run's trajectory (TRAJECTORY_FILE) instead of the weights; resuming
        #: replays it onto the model, which must hold the base weights (see :meth:`_load_from_checkpoint`).
        self.save_trajectory_only = save_trajectory_only
        self._mezo_resumed_trajectory = None
        model = getattr(self, "model", None)
        if model is not None and not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"{type(self).__name__}: the model has no trainable parameters (none has "
                             "requires_grad=True); MeZO would have nothing to train")
        if self.optimizer is not None:
            self._mezo_optimizer()  # raises if it is not a MeZOTrainerOptimizer
            return
        cls_and_kwargs = getattr(self, "optimizer_cls_and_kwargs", None)
        if cls_and_kwargs is not None:
            cls = cls_and_kwargs[0]
            if not (isinstance(cls, type) and issubclass(cls, MeZOTrainerOptimizer)):
                raise TypeError(f"{type(self).__name__} trains with fastmezo's MeZOTrainerOptimizer, but "
                                f"optimizer_cls_and_kwargs names {getattr(cls, '__name__', cls)!r}; use "
                                "mezo_optimizer_cls_and_kwargs(model, args)")
        elif type(self).create_optimizer is Trainer.create_optimizer:
            raise ValueError(f"{type(self).__name__} needs the MeZO optimizer: pass optimizer_cls_and_kwargs="
                             "mezo_optimizer_cls_and_kwargs(model, args, eps=...) or "
                             "optimizers=(MeZOTrainerOptimizer(...), None)")

    def _mezo_optimizer(self) -> MeZOTrainerOptimizer:
        """The MeZOTrainerOptimizer under the Trainer's optimizer; a clear error if there is none."""
        optimizer = _unwrap(self.optimizer)
        if isinstance(optimizer, MeZOTrainerOptimizer):
            return optimizer
        if isinstance(optimizer, MeZO):
            raise TypeError("the Trainer steps its optimizer without a closure, which fastmezo.MeZO.step "
                            "needs: use fastmezo.integrations.transformers.MeZOTrainerOptimizer (same arguments)")
        raise TypeError(f"{type(self).__name__} needs a fastmezo MeZOTrainerOptimizer optimizer, got "
                        f"{type(optimizer).__name__}")

    def _mezo_loss_scale(self, num_items_in_batch) -> float:
        """The factor the Trainer applies to a micro-batch's loss before backward (the same rule as
        Trainer.training_step): 1 when the loss is already normalised over the accumulated batch
        (num_items_in_batch given to a model that takes it, or a compute_loss_func), else 1/k."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                      or getattr(self, "compute_loss_func", None) is not None)
        if scaled:
            return 1.0
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / steps

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Both MeZO forwards of one micro-batch under the step's z; the weights are restored before
        it returns (also on an exception). No backward. Returns the detached mean of the two scaled
        losses (l_plus + l_minus) / 2, on ``args.device``, for the Trainer's loss log. The update
        itself is applied by ``optimizer.step()`` after the last micro-batch of the step."""
        optimizer = self._mezo_optimizer()
        if not any(p.numel() for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("the MeZO optimizer has no parameters to train (does any parameter of the "
                             "model have requires_grad=True?)")
        if self.save_trajectory_only and (optimizer.trajectory is None or self._mezo_resumed_trajectory):
            self._mezo_record_trajectory(optimizer)
        if self.mezo_data_parallel is None and optimizer.reduce_losses is None:
            self._mezo_data_parallel(optimizer)
        prepare_cp = getattr(self, "_prepare_context_parallel_inputs", None)  # transformers 5
        cp_context, inputs = prepare_cp(model, inputs) if prepare_cp else (contextlib.nullcontext, inputs)
        scale = self._mezo_loss_scale(num_items_in_batch)

        def closure():
            # compute_loss may pop entries (labels, with a label smoother): give it a copy each time.
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, copy.copy(inputs), num_items_in_batch=num_items_in_batch)
            if self.args.n_gpu > 1:
                loss = loss.mean()  # DataParallel returns one loss per device
            return loss.detach().float() * scale

        with cp_context():
            inputs = self._prepare_inputs(inputs)
            modes = [(module, module.training) for module in model.modules()]
            model.train(not self.mezo_eval_mode)
            try:
                loss_plus, loss_minus = optimizer.accumulate(closure)
            finally:
                for module, training in modes:
                    module.training = training
        return torch.tensor((loss_plus + loss_minus) / 2.0, dtype=torch.float32, device=self.args.device)

    def _mezo_data_parallel(self, optimizer: MeZOTrainerOptimizer) -> None:
        """With several processes: average the losses over the ranks (fastmezo.data_parallel), so that
        every rank applies the same update."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        if _sharded(self.model):
            held = {id(p) for p in self.model.parameters()}
            if any(id(p) not in held for group in optimizer.param_groups for p in group["params"]):
                raise ValueError("the MeZO optimizer holds tensors that are not the model's parameters: with "
                                 "FSDP2, call mezo_optimizer_cls_and_kwargs(model, args) after fully_shard(model), "
                                 "whose DTensor parameters replace the ones it was given")
        from ..distributed import data_parallel
        self.mezo_data_parallel = data_parallel(optimizer, check_every=self.mezo_check_every, model=self.model)

    def _defer_fsdp_gradient_reduction(self):
        """The Trainer's no_sync for FSDP2 models it did not wrap: MeZO runs no backward, so there is no
        gradient reduction to defer (and the caller's FSDP2 model has no DistributedConfig to read)."""
        return contextlib.nullcontext()

    # -- trajectory-only checkpoints ------------------------------------------------------------
    def _mezo_record_trajectory(self, mezo: MeZOTrainerOptimizer) -> None:
        """Before the first micro-batch (weights not yet trained): with ``save_trajectory_only`` the
        optimizer records a trajectory from the weights it starts from, or continues the resumed one."""
        resumed, self._mezo_resumed_trajectory = self._mezo_resumed_trajectory, None
        if resumed is not None:
            if resumed.header["strategy"] != mezo.perturbation_mode:
                raise ValueError(f"the checkpoint's trajectory was recorded in {resumed.header['strategy']} "
                                 f"mode, this optimizer runs in {mezo.perturbation_mode} mode")
            mezo.trajectory = resumed
        elif mezo.trajectory is None:
            mezo.trajectory = Trajectory.of_optimizer(mezo)

    def _save(self, output_dir=None, state_dict=None):
        """Model checkpoints: the weights (the Trainer's way) or, with ``save_trajectory_only``, the
        trajectory file (and the training arguments) only."""
        if state_dict is None and _sharded(self.model):
            # The Trainer calls _save on every rank of a model it did not shard: all join the gathers,
            # the main process alone receives the whole weights and writes them.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            state_dict = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
            if not self.args.should_save:
                return None
        if not self.save_trajectory_only:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        optimizer = _unwrap(self.optimizer)
        if getattr(optimizer, "trajectory", None) is None:
            raise ValueError("save_trajectory_only: there is no trajectory to save yet (the optimizer records it "
                             "from the first training step)")
        os.makedirs(output_dir, exist_ok=True)
        optimizer.trajectory.save(os.path.join(output_dir, TRAJECTORY_FILE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """A trajectory-only checkpoint: the trajectory is replayed onto the model, which must hold the
        base weights (checked by their sha256); training then continues recording it. Other checkpoints
        load the Trainer's way."""
        path = os.path.join(resume_from_checkpoint, TRAJECTORY_FILE)
        model = model if model is not None else self.model
        weights = os.path.join(resume_from_checkpoint, "model.safetensors")
        if _sharded(model) and os.path.isfile(weights):
            # The checkpoint holds the gathered weights: each rank loads its own shards from them.
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            result = set_model_state_dict(model, load_file(weights), options=StateDictOptions(
                full_state_dict=True, strict=False))
            missing = [k for k in result.missing_keys if k not in _tied_names(model)]
            if missing or result.unexpected_keys:
                raise ValueError(f"{weights} does not match the model: missing {missing[:3]}, unexpected "
                                 f"{result.unexpected_keys[:3]}")
            return None
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        trajectory = Trajectory.load(path)
        replay(model, trajectory)
        self._mezo_resumed_trajectory = trajectory
        return None

    def log(self, logs, *args, **kwargs):
        """Add the projected gradient to the training logs; drop the (meaningless) gradient norm."""
        if "loss" in logs:
            optimizer = _unwrap(self.optimizer)
            if isinstance(optimizer, MeZOTrainerOptimizer) and optimizer.unlogged_projected_grads:
                grads = optimizer.unlogged_projected_grads
                logs["projected_grad"] = grads[-1]
                logs["projected_grad_abs_mean"] = sum(abs(g) for g in grads) / len(grads)
                grads.clear()
            logs.pop("grad_norm", None)
        return super().log(logs, *args, **kwargs)


def _sharded(model) -> bool:
    return model is not None and any(_is_dtensor(p) for p in model.parameters())


def _tied_names(model) -> set:
    """Names under which a parameter appears beside its first name (tied weights, which
    named_parameters() and a saved checkpoint list once)."""
    return set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))

