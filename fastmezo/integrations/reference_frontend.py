"""Drop-in backend for existing MeZO trainers: the paper's and ZO-Bench's (docs/frontends.md).

One call switches a trainer instance to fastmezo's fused in-place passes, with the trainer's own
semantics and z from fastmezo's noise contract (seed = the trainer's ``zo_random_seed``, drawn with
``np.random.randint`` as the trainer does; tensor key = the parameter's position in
``named_parameters_to_optim``)::

    handle = fastmezo.integrations.use_fastmezo(trainer)
    trainer.train()
    handle.remove()          # the trainer's own methods are back

Every method of the trainer that draws z is replaced: ``zo_step`` and ``zo_perturb_parameters`` for
both trainers, ``zo_update`` for the paper's (ZO-Bench's only steps the scheduler and is kept) and
``zo_step_v1`` (q > 1) for ZO-Bench's; ZO-Bench's methods for modes the adapter refuses are replaced
by methods that raise. A trainer in a mode that fastmezo cannot reproduce exactly (zo_adam, momentum,
sparsity, module-wise, zo_conserv, forward_grad, ...) or with an unknown method that may draw z is
refused, with the option named, before anything on it changes (:mod:`.frontend_modes`).

Data parallel (torchrun: each rank its own batch, a replica of the model, DDP-wrapped or not): when
torch.distributed is initialized with several processes (or ``data_parallel=True`` / a process group),
every step averages its losses over the ranks in one float64 all-reduce (fastmezo.distributed.mean_losses,
as fastmezo.data_parallel does), which also checks that every rank drew the same seeds. Every rank then
applies the same update, so the replicas stay bit-identical; a non-finite loss anywhere is one on every
rank, and a forward that raises on one rank makes every rank undo the step and raise. FSDP2 (DTensor)
parameters are refused: the trainers' forwards read FSDP's gathered copies, which the passes on the
shards would not reach.

Each replaced step is a transaction: if anything raises inside it (a forward, a pass, an interrupt),
the passes already applied are undone by opposite passes along the same z and the error propagates,
so the weights are back at their start up to rounding (the restore pass of in-place MeZO) and a retry
does not accumulate.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .. import functional as F
from ..distributed import mean_losses
from ..engine import NO_DECAY
from .frontend_modes import (GUARDED, PAPER, REPLACED, ZO_BENCH, check_methods, process_group, read_mode, real,
                             refuse_dtensors, seed_of)

_REQUIRED = ("zo_step", "zo_perturb_parameters", "zo_update", "zo_forward")


class _Passes:
    """The passes of one step along z(seed) for a list of parameters, recorded so that ``undo()``
    can walk the parameters back to where the step found them."""

    def __init__(self, params, noise, backend):
        self.params, self.noise, self.backend = params, noise, backend
        self.offsets: dict[int, float] = {}       # seed -> net alpha applied along z(seed)
        self.updates: list[tuple] = []            # (seed, per-tensor lr, coefficient) applied

    def perturb(self, seed: int, alpha: float) -> None:
        F.perturb_(self.params, seed, alpha, noise=self.noise, backend=self.backend)
        self.offsets[seed] = self.offsets.get(seed, 0.0) + alpha

    def update(self, seed: int, lrs, coefficient: float) -> None:
        """theta -= lr * coefficient * z, for parameters at theta."""
        F.update_(self.params, seed, lrs, coefficient, noise=self.noise, backend=self.backend)
        self.updates.append((seed, lrs, coefficient))

    def restore_and_update(self, seed: int, eps: float, lrs, coefficient: float) -> None:
        """The same update for parameters at theta - eps z, restoring them in the same pass."""
        F.restore_and_update_(self.params, seed, eps, lrs, coefficient, noise=self.noise,
                              backend=self.backend)
        self.offsets[seed] = self.offsets.get(seed, 0.0) + eps
        self.updates.append((seed, lrs, coefficient))

    def undo(self) -> None:
        for seed, lrs, coefficient in reversed(self.updates):
            F.update_(self.params, seed, lrs, -coefficient, noise=self.noise, backend=self.backend)
        for seed, alpha in self.offsets.items():
            if alpha:
                F.perturb_(self.params, seed, -alpha, noise=self.noise, backend=self.backend)


@contextlib.contextmanager
def _transaction(params, noise, backend):
    passes = _Passes(params, noise, backend)
    try:
        yield passes
    except BaseException:
        passes.undo()
        raise


def _new_seed() -> int:
    # np.random.randint(1000000000), as both trainers draw it: same seeds, same numpy RNG state.
    return int(np.random.randint(1000000000))


class FastMeZOFrontend:
    """Handle of a switched trainer; ``remove()`` gives the trainer its own methods back."""

    def __init__(self, trainer, noise: str = "gaussian", backend: str | None = None, data_parallel=None):
        if "_fastmezo_frontend" in vars(trainer):
            raise RuntimeError("this trainer already uses fastmezo; call remove() on its handle first")
        missing = [name for name in _REQUIRED if not callable(getattr(trainer, name, None))]
        if missing:
            raise TypeError(f"{type(trainer).__name__} has no {', '.join(missing)}: it does not follow "
                            "the MeZO trainers' interface (zo_step, zo_perturb_parameters, zo_update)")
        mode = read_mode(trainer)            # refuses unsupported options before anything changes
        check_methods(trainer, mode.frontend)
        F.make_noise(1, 0, noise=noise, backend=backend)   # a bad noise or backend name fails here
        self.data_parallel, self.group = process_group(data_parallel)
        self._failure = None           # this rank's forward exception during the current step (data parallel)
        if isinstance(getattr(trainer, "model", None), torch.nn.Module):
            refuse_dtensors(trainer.model.named_parameters())
        self.trainer, self.frontend, self.noise, self.backend = trainer, mode.frontend, noise, backend
        own = {PAPER: (self._paper_zo_step, self._zo_perturb_parameters, self._paper_zo_update),
               ZO_BENCH: (self._zo_bench_zo_step, self._zo_bench_zo_step_v1, self._zo_perturb_parameters)}
        installed = dict(zip(REPLACED[mode.frontend], own[mode.frontend]))
        for name in GUARDED[mode.frontend]:
            if hasattr(trainer, name):
                installed[name] = self._guard(name)
        self._saved = {name: vars(trainer)[name] for name in installed if name in vars(trainer)}
        self._installed = tuple(installed)
        for name, method in installed.items():
            setattr(trainer, name, method)
        trainer._fastmezo_frontend = self

    # -- shared ----------------------------------------------------------------------------------

    def _mode(self):
        mode = read_mode(self.trainer)
        if mode.frontend != self.frontend:
            raise RuntimeError(f"args.trainer now selects {mode.frontend}, but the trainer was switched "
                               f"as {self.frontend}; remove() and switch it again")
        return mode

    def _select_parameters(self, model):
        t = self.trainer
        t.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        refuse_dtensors(t.named_parameters_to_optim)
        return list(t.named_parameters_to_optim)

    def _forward(self, model, inputs):
        """The trainer's zo_forward. Data parallel: a forward that raises is kept for the all-reduce
        (and the step's later forwards are skipped), so that this rank still joins it."""
        if not self.data_parallel:
            return self.trainer.zo_forward(model, inputs)
        if self._failure is not None:
            return None
        try:
            return self.trainer.zo_forward(model, inputs)
        except BaseException as exc:       # KeyboardInterrupt too: the other ranks must not wait for us
            self._failure = exc
            return None

    def _projected_grads(self, pairs, seeds, divisor: float) -> list[float]:
        """(l1 - l2) / divisor for each (l1, l2) of ``pairs``: on one process the trainers' own
        arithmetic on their loss tensors; data parallel, on the means over the ranks (one all-reduce)."""
        if not self.data_parallel:
            return [((loss1 - loss2) / divisor).item() for loss1, loss2 in pairs]
        failure, self._failure = self._failure, None
        losses = [math.nan if failure is not None else float(x) for pair in pairs for x in pair]
        means = mean_losses(losses, failure, self.group, agree=seeds, where="in this step")
        return [(means[2 * i] - means[2 * i + 1]) / divisor for i in range(len(pairs))]

    def _guard(self, name):
        def refuse(*args, **kwargs):
            self._mode()   # names the option that selected this method, if it is one
            raise RuntimeError(f"{name}() draws z with torch in a mode fastmezo does not reproduce; "
                               "it cannot run while the trainer uses fastmezo")
        return refuse

    def _zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        """theta += scaling_factor * zo_eps * z(seed), one fused in-place pass."""
        t = self.trainer
        mode = self._mode()
        if random_seed is None:
            step_seed = seed_of(t.zo_random_seed)
        else:
            step_seed = seed_of(random_seed, "random_seed")
        alpha = real(scaling_factor, "scaling_factor") * mode.eps
        F.perturb_(list(t.named_parameters_to_optim), step_seed, alpha, noise=self.noise,
                   backend=self.backend)

    # -- the paper's trainer: zo_step estimates, zo_update applies -------------------------------

    def _paper_zo_step(self, model, inputs):
        """+eps, forward, -2 eps, forward, +eps (restore); sets projected_grad; returns loss(+eps)."""
        t, mode = self.trainer, self._mode()
        params = self._select_parameters(model)
        t.zo_random_seed = step_seed = _new_seed()
        with _transaction(params, self.noise, self.backend) as passes:
            passes.perturb(step_seed, mode.eps)
            loss1 = self._forward(model, inputs)
            passes.perturb(step_seed, -2 * mode.eps)
            loss2 = self._forward(model, inputs)
            t.projected_grad, = self._projected_grads([(loss1, loss2)], [step_seed], 2 * mode.eps)
            passes.perturb(step_seed, mode.eps)
        return loss1

    def _paper_zo_update(self, model=None):
        """theta <- theta - lr * (projected_grad * z + wd * theta), wd skipped on bias / layer norm
        names, lr from _get_learning_rate(); then the lr scheduler steps."""
        t = self.trainer
        self._mode()
        params = list(t.named_parameters_to_optim)
        lr = real(t._get_learning_rate(), "the learning rate (_get_learning_rate())")
        wd = real(t.args.weight_decay, "args.weight_decay")
        decay = [0.0 if any(s in name for s in NO_DECAY) else wd for name, _ in params]
        F.update_(params, seed_of(t.zo_random_seed), lr, real(t.projected_grad, "projected_grad"),
                      weight_decay=decay, noise=self.noise, backend=self.backend)
        t.lr_scheduler.step()

    # -- ZO-Bench: the step methods apply the update through an SGD optimizer ---------------------

    def _zo_bench_zo_step(self, model, inputs):
        if self._mode().q != 1:
            raise ValueError(f"ZO-Bench's zo_step runs q = 1 (args.q = {self.trainer.args.q}); its "
                             "training loop calls zo_step_v1 for q > 1")
        return self._zo_bench_step(model, inputs)

    def _zo_bench_zo_step_v1(self, model, inputs):
        return self._zo_bench_step(model, inputs)

    def _sgd_learning_rates(self, params) -> list[float]:
        """Per parameter, the lr its trainer.optimizer.step() would use: the optimizer must be the
        plain SGD ZO-Bench builds (a parameter it does not hold is not moved: lr 0)."""
        opt = getattr(self.trainer, "optimizer", None)
        if not isinstance(opt, torch.optim.SGD):
            raise ValueError(f"trainer.optimizer is {type(opt).__name__}; ZO-Bench's step applies its "
                             "update with it and use_fastmezo reproduces torch.optim.SGD only")
        lr_of = {}
        for i, group in enumerate(opt.param_groups):
            for option, plain in (("momentum", 0), ("weight_decay", 0), ("maximize", False)):
                if group.get(option, plain) != plain:
                    raise ValueError(f"use_fastmezo does not support trainer.optimizer.param_groups[{i}]"
                                     f"[{option!r}]={group[option]!r}: only plain SGD is reproduced")
            lr = real(group["lr"], f"trainer.optimizer.param_groups[{i}]['lr']")
            lr_of.update((id(p), lr) for p in group["params"])
        return [lr_of.get(id(p), 0.0) for _, p in params]

    def _zo_bench_step(self, model, inputs):
        """q directions, each with its own seed: +eps, forward, then -2 eps, forward (two-sided) or
        -eps, forward at theta (one-sided); every loss at theta +- eps z_i. Then one SGD update
        theta -= lr * sum_i c_i z_i / q with c_i = projected_grad_i (or its sign for zo_sign_opt),
        as the optimizer applies param.grad = sum_i c_i z_i / q. The last direction's restore is fused
        with its update. Returns the last direction's loss(+eps)."""
        t, mode = self.trainer, self._mode()
        params = self._select_parameters(model)
        lrs = self._sgd_learning_rates(params)
        for _, p in params:
            p.grad = None        # as ZO-Bench leaves them: its update goes through .grad and clears it
        seeds, pairs = [], []
        with _transaction(params, self.noise, self.backend) as passes:
            for i in range(mode.q):
                t.zo_random_seed = step_seed = _new_seed()
                seeds.append(step_seed)
                passes.perturb(step_seed, mode.eps)
                loss1 = self._forward(model, inputs)
                passes.perturb(step_seed, -mode.eps if mode.one_sided else -2 * mode.eps)
                pairs.append((loss1, self._forward(model, inputs)))
                if not mode.one_sided and i < mode.q - 1:
                    passes.perturb(step_seed, mode.eps)
            grads = self._projected_grads(pairs, seeds, mode.eps if mode.one_sided else 2 * mode.eps)
            t.projected_grad = grads[-1]
            directions = []
            for step_seed, g in zip(seeds, grads):
                g = real(g, "projected_grad")
                directions.append((step_seed, (float(np.sign(g)) if mode.sign else g) / mode.q))
            last_seed, last_coefficient = directions.pop()
            if mode.one_sided:
                passes.update(last_seed, lrs, last_coefficient)
            else:
                passes.restore_and_update(last_seed, mode.eps, lrs, last_coefficient)
            for step_seed, coefficient in directions:
                passes.update(step_seed, lrs, coefficient)
        return loss1

    def remove(self) -> None:
        """Give the trainer its own methods back. Idempotent."""
        t = self.trainer
        if vars(t).get("_fastmezo_frontend") is not self:
            return
        for name in self._installed:
            if name in self._saved:
                setattr(t, name, self._saved[name])
            else:
                delattr(t, name)
        del t._fastmezo_frontend


def use_fastmezo(trainer, *, noise: str = "gaussian", backend: str | None = None,
                 data_parallel=None) -> FastMeZOFrontend:
    """Switch a MeZO trainer instance (the paper's or ZO-Bench's) to fastmezo's fused passes, or
    refuse it, unchanged, with the option it does not support named (see the module doc).

    ``noise="rademacher"`` draws z from +-1 instead of the trainers' Gaussian: a different
    algorithm, on request only. ``data_parallel``: None (default) averages every step's losses over
    the ranks when torch.distributed is initialized with several processes; True or a process
    group require it; False keeps each process on its own losses (independent runs)."""
    return FastMeZOFrontend(trainer, noise=noise, backend=backend, data_parallel=data_parallel)
