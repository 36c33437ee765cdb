"""The step engine: one body for every MeZO step, whatever holds theta +- eps*z.

A step (Malladi et al., 2023): choose the seed; perturb by +eps*z; forward; perturb to -eps*z; forward;
g = (l+ - l-) / (2 eps); restore and update theta <- (1 - lr*wd) * theta - lr * g * z. A *strategy* says
where the perturbed weights live and exposes the stages; this module runs them, as a transaction:

  InPlace  writes theta +- eps*z into the stored weights; the update pass also restores them (three
           passes a step). Undoing a step is a restore pass, exact up to float rounding.
  Exact    (fastmezo.exact) materializes W +- eps*z per module group during each forward; the stored
           weights change only at the update pass, so undoing a step is bit-exact.

Transactions: whatever raises (a closure, a loss that is not a number, a backend, KeyboardInterrupt),
the weights end where the step found them, and the exception propagates; a retry starts from there.
A step whose update would make a weight non-finite (a huge projected gradient, a non-finite loss) is
skipped: the weights are restored and :class:`StepResult` says why.

Every public entry runs :func:`run_step` (then, for gradient accumulation, :func:`apply_update`):
``MeZO.step``, ``MeZO.accumulate``/``step_accumulated``, the Trainer's optimizer, the frontend adapter.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .noise import rounding_seed
from .checks import nonnegative, positive
from .plan import Plan

#: Pass indices of a step, which key the stochastic-rounding bits: +eps, -2 eps, then restore (+ update).
#: Gradient accumulation gives micro-batch j the indices 3j, 3j + 1, 3j + 2 and the update 3k.
PLUS, MINUS, RESTORE = 0, 1, 2

#: MeZO's ``stochastic_rounding`` modes: "update" (the default) rounds float16/bfloat16 results
#: stochastically in the update pass only, where an update far below one ulp must survive on average;
#: True in every pass (the perturbation passes too: no less drift, measured, and each such pass costs
#: more); False never (round to nearest, as the reference).
ROUNDING_MODES = ("update", True, False)


def rounding_passes(mode) -> tuple[bool, bool]:
    """(the perturbation and restore passes round stochastically, the update pass does) for a mode."""
    return mode is True, mode is True or mode == "update"


def is_rounding_mode(mode) -> bool:
    """Whether ``mode`` is one of :data:`ROUNDING_MODES` (by type too: 1 is not True)."""
    return isinstance(mode, bool) or mode == "update"


def check_rounding(mode):
    """``mode`` if it is one of :data:`ROUNDING_MODES`, else a TypeError naming it."""
    if not is_rounding_mode(mode):
        raise TypeError(f'stochastic_rounding must be "update", True or False, got {mode!r}')
    return mode


#: Substrings of parameter names that the reference skips weight decay for (bias and norm parameters).
NO_DECAY = ("bias", "layer_norm", "layernorm")


def update_coefficients(lr: float, weight_decay: float, projected_grad: float, restore_eps: float | None = None):
    """(a, b) of the update pass x <- a * x + b * z, in float64:

        a = 1 - lr * wd,   b = -lr * g                       (x at theta)
                           b = a * eps - lr * g              (x at theta - eps z: restore fused in)
    """
    a = 1.0 - lr * weight_decay
    if restore_eps is None:
        return a, -lr * projected_grad
    return a, a * restore_eps - lr * projected_grad


def loss_value(loss, which: str) -> float:
    """The closure's loss as a Python float; a clear error for anything that is not one number."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, but at {which} it returned a tensor "
                             f"of shape {tuple(loss.shape)} (reduce it, e.g. with .mean())")
        if loss.dtype == torch.bool or loss.is_complex():
            raise TypeError(f"the closure returned a {loss.dtype} tensor at {which}; expected a number")
        return float(loss.detach().item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"the closure must return the loss as a number or a scalar tensor, but at {which} "
                    f"it returned {type(loss).__name__}")


@dataclasses.dataclass
class Hyper:
    """Validated hyper-parameters of one param group for one step."""
    lr: float
    eps: float
    weight_decay: float


def group_hyper(group: dict, index: int) -> Hyper:
    """lr >= 0, eps > 0 (a normal float32), weight_decay >= 0, as real numbers (strings and bools
    refused: a YAML "1e-3" must not reach a pass), and lr * weight_decay <= 2: the update multiplies
    the weights by 1 - lr * wd, which must not grow them."""
    hyper = Hyper(lr=nonnegative(group["lr"], f"lr of param group {index}"),
                  eps=positive(group["eps"], f"eps of param group {index}"),
                  weight_decay=nonnegative(group["weight_decay"], f"weight_decay of param group {index}"))
    check_decay(hyper.lr, hyper.weight_decay, f"param group {index}")
    return hyper


def check_decay(lr: float, weight_decay: float, what: str) -> None:
    if lr * weight_decay > 2.0:
        raise ValueError(f"{what}: lr * weight_decay = {lr * weight_decay:g} > 2 would grow the weights "
                         "(the update multiplies them by 1 - lr * weight_decay)")


@dataclasses.dataclass
class StepResult:
    """What a step did. ``grads`` is one projected gradient per group (NaN when skipped); ``skipped``
    None, or the reason the update was not applied (the weights were restored)."""
    loss_plus_obj: object
    loss_plus: float
    loss_minus: float
    grads: list
    skipped: str | None = None


class _Offsets:
    """Where each part of the weights (a device's coefficient group, :meth:`Plan.units`) stands, in
    units of +eps*z, for in-place passes: a pass records the parts it finished, so an undo moves back
    exactly those that moved."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.at = {unit: 0 for unit in plan.units()}

    def move(self, seed, eps, frm: int, to: int, pass_index: int, rounding: bool) -> None:
        """Move the devices at ``frm`` to ``to`` (b = (to - frm) * eps, written as the reference does)."""
        step = to - frm
        b = [step * e for e in eps]            # exact: a product with +-1 or +-2 only moves the exponent
        todo = {unit for unit, s in self.at.items() if s == frm}
        rs = rounding_seed(seed, pass_index) if rounding else None
        # Plan.run records each part as it finishes: after a failure, exactly those have moved.
        done = []
        try:
            self.plan.run(seed, [1.0] * len(eps), b, round_seed=rs, units=todo, done=done)
        finally:
            for unit in done:
                self.at[unit] = to

    def restore(self, seed, eps, pass_index: int, rounding: bool) -> None:
        """Every device back to theta (one pass per distinct offset)."""
        for frm in sorted({s for s in self.at.values() if s}):
            self.move(seed, eps, frm, 0, pass_index, rounding)


class InPlace:
    """theta +- eps*z written into the stored weights; the update pass restores them."""
    name = "inplace"

    def check(self, plan: Plan) -> None:
        pass

    def forwards(self, plan, seed, eps, closure, first: int, rounding: bool):
        """l+ and l-; returns (loss_plus_obj, l+, l-, offsets) with the weights at theta - eps*z. On any
        exception the weights are restored (pass first + 2) before it propagates."""
        offsets = _Offsets(plan)
        try:
            offsets.move(seed, eps, 0, 1, first + PLUS, rounding)
            loss_plus_obj = closure()
            loss_plus = loss_value(loss_plus_obj, "theta + eps*z")
            offsets.move(seed, eps, 1, -1, first + MINUS, rounding)
            loss_minus = loss_value(closure(), "theta - eps*z")
        except BaseException:
            offsets.restore(seed, eps, first + RESTORE, rounding)
            raise
        return loss_plus_obj, loss_plus, loss_minus, offsets

    def restore(self, offsets, seed, eps, pass_index, rounding) -> None:
        offsets.restore(seed, eps, pass_index, rounding)

    def update(self, hyper: Hyper, grad: float):
        """(a, b) of the update from theta - eps z, where the forwards leave the weights."""
        return update_coefficients(hyper.lr, hyper.weight_decay, grad, restore_eps=hyper.eps)


class Exact:
    """theta +- eps*z materialized per module group by a provider (fastmezo.exact.ExactPerturbation)
    during the forwards; the stored weights are only read until the update."""
    name = "exact"

    def __init__(self, provider):
        self.provider = provider

    def check(self, plan: Plan) -> None:
        missing = self.provider.covered(plan.tensors)
        if missing:
            raise ValueError(f"exact mode: tensor {missing[0]} of the optimizer is not a parameter of the "
                             "patched model, so no module would perturb it; give MeZO the model's parameters")

    def forwards(self, plan, seed, eps, closure, first: int, rounding: bool):
        with self.provider.perturbation(plan, seed, eps):
            loss_plus_obj = closure()
            loss_plus = loss_value(loss_plus_obj, "theta + eps*z")
        with self.provider.perturbation(plan, seed, [-e for e in eps]):
            loss_minus = loss_value(closure(), "theta - eps*z")
        return loss_plus_obj, loss_plus, loss_minus, None

    def restore(self, offsets, seed, eps, pass_index, rounding) -> None:
        pass

    def update(self, hyper: Hyper, grad: float):
        """(a, b) of the update from theta, where the stored weights stayed."""
        return update_coefficients(hyper.lr, hyper.weight_decay, grad)


def projected_grads(loss_plus: float, loss_minus: float, hypers) -> list:
    """g_i = (l+ - l-) / (2 eps_i) per group: the unbiased estimate for each group's own scale."""
    diff = loss_plus - loss_minus
    return [diff / (2.0 * h.eps) for h in hypers]


def run_step(strategy, plan: Plan, seed: int, hypers, closure, *, rounding, first: int = 0,
             update: bool = True, reduce_losses=None) -> StepResult:
    """One step's forwards, then (``update``) the update pass, or the restore alone when the update is
    refused. ``update=False`` (gradient accumulation): the weights are restored after the forwards and
    the estimate returned for :func:`apply_update`. ``reduce_losses(l+, l-) -> (l+, l-)`` combines the
    losses of several processes (data parallel: every rank then applies the same update); it runs
    after the forwards, inside the transaction. ``rounding``: one of :data:`ROUNDING_MODES`."""
    rounding, update_rounding = rounding_passes(rounding)
    eps = [h.eps for h in hypers]
    plan.check_coefficients([1.0] * len(eps), [-2.0 * e for e in eps], "the perturbation (-2 eps)")
    loss_plus_obj, loss_plus, loss_minus, offsets = strategy.forwards(plan, seed, eps, closure, first, rounding)
    try:
        if reduce_losses is not None:
            loss_plus, loss_minus = reduce_losses(loss_plus, loss_minus)
        grads = projected_grads(loss_plus, loss_minus, hypers)
        skipped = None if all(math.isfinite(g) for g in grads) else "non-finite loss"
        if update and skipped is None:
            a, b = map(list, zip(*(strategy.update(h, g) for h, g in zip(hypers, grads))))
            try:
                plan.check_coefficients(a, b, "the update")
            except OverflowError as exc:
                skipped = f"update refused: {exc}"
            else:
                _apply(plan, seed, a, b, first + RESTORE, update_rounding, offsets, eps, rounding)
                return StepResult(loss_plus_obj, loss_plus, loss_minus, grads)
        strategy.restore(offsets, seed, eps, first + RESTORE, rounding)
    except BaseException:
        strategy.restore(offsets, seed, eps, first + RESTORE, rounding)
        raise
    if skipped is not None:
        grads = [float("nan")] * len(hypers)
    return StepResult(loss_plus_obj, loss_plus, loss_minus, grads, skipped)


def _apply(plan: Plan, seed, a, b, pass_index, rounding, offsets, eps, restore_rounding=False) -> None:
    """The update pass, part by part. If a part fails, those already updated are moved back by the
    inverse pass (x - b z) / a to where the update found them, then (in place) every part is restored
    to theta (rounding as the perturbation passes did), and the error propagates."""
    rs = rounding_seed(seed, pass_index) if rounding else None
    done = []
    try:
        plan.run(seed, a, b, round_seed=rs, done=done)
    except BaseException:
        plan.undo(seed, a, b, done, rs)
        if offsets is not None:
            offsets.restore(seed, eps, pass_index, restore_rounding)
        raise


def apply_update(plan: Plan, seed: int, hypers, grads, *, pass_index: int, rounding) -> str | None:
    """The update of an accumulated step (weights at theta): x <- (1 - lr wd) x - lr g z. Returns None,
    or the reason it was refused (nothing changed). ``rounding``: one of :data:`ROUNDING_MODES`."""
    rounding = rounding_passes(rounding)[1]
    a, b = map(list, zip(*(update_coefficients(h.lr, h.weight_decay, g) for h, g in zip(hypers, grads))))
    try:
        plan.check_coefficients(a, b, "the update")
    except OverflowError as exc:
        return f"update refused: {exc}"
    _apply(plan, seed, a, b, pass_index, rounding, None, None)
    return None


class Paired(Exact):
    """Both forwards in one (fastmezo.paired.PairedPerturbation): the closure runs a doubled batch whose
    first half sees theta + eps*z and second half theta - eps*z, and returns (l+, l-). The stored weights
    are only read until the update, as in exact mode."""
    name = "paired"

    def forwards(self, plan, seed, eps, closure, first: int, rounding: bool):
        with self.provider.perturbation(plan, seed, eps):
            losses = closure()
        if not (isinstance(losses, (tuple, list)) and len(losses) == 2):
            raise TypeError(f"in paired mode the closure must return (loss_plus, loss_minus), got "
                            f"{type(losses).__name__}")
        return losses[0], loss_value(losses[0], "theta + eps*z"), loss_value(losses[1], "theta - eps*z"), None
