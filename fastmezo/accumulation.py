"""Gradient accumulation for :class:`fastmezo.MeZO`: several micro-batches' estimates, one update.

``accumulate(closure)`` runs one micro-batch's two perturbed forwards along the pending step's z and
adds its loss difference to a window; ``step_accumulated()`` applies one update from the sum. Apart
from fastmezo/optim.py because it is a second way of driving the same step engine, with its own
state (the window) and rules (which step a window belongs to); the optimizer's own attributes it uses
(``_hypers``, ``_plan``, ``_strategy``, ``_record``, ``seed``, ``step_count``, ``on_nonfinite``,
``stochastic_rounding``, ``reduce_losses``) are defined in :class:`fastmezo.MeZO`.
"""
from __future__ import annotations

import math

import torch

from . import engine
from .noise import derive_seed


class MicroBatches:
    """The accumulation methods of :class:`fastmezo.MeZO` (a mixin: it holds no state of its own
    beyond the pending window)."""

    _window = None

    @property
    def pending_micro_batches(self) -> int:
        """How many micro-batches :meth:`accumulate` has added to the pending step."""
        return 0 if self._window is None else self._window["count"]

    def _pending_window(self, create: bool):
        window = self._window
        seed = derive_seed(self.seed, self.step_count)
        if window is not None and (window["step"] != self.step_count or window["seed"] != seed
                                   or len(window["grads"]) != len(self.param_groups)):
            self._window = None
            raise RuntimeError(f"the micro-batch estimates pending since accumulate() belong to step "
                               f"{window['step']}, but the optimizer has moved on (step {self.step_count}; "
                               "step(), load_state_dict() or add_param_group() in between): they were dropped")
        if window is None and create:
            window = self._window = dict(step=self.step_count, seed=seed, grads=[0.0] * len(self.param_groups),
                                         loss_plus=0.0, loss_minus=0.0, count=0, nonfinite=False)
        return window

    @torch.no_grad()
    def accumulate(self, closure):
        """Add one micro-batch's estimate to the pending step (gradient accumulation). The weights
        are back at theta when it returns, also when anything raises.

        Perturbs by +eps*z and calls ``closure()``, by -2 eps*z and calls it again, then restores
        (+eps*z). All micro-batches of a step use one z, the pending step's (seed
        ``derive_seed(seed, step_count)``), and their loss differences add up as gradients do under
        ``backward()``: scale the closure's loss by 1/k for the mean over k micro-batches.
        :meth:`step_accumulated` then applies one update with
        g_i = sum_j (l_plus_j - l_minus_j) / (2 eps_i).

        Three passes per micro-batch and one for the update (``step`` fuses the restore into the
        update: three in all for a single batch); micro-batch j rounds with the bits of passes 3j,
        3j + 1, 3j + 2. The pending estimates are not in :meth:`state_dict`: save after
        ``step_accumulated``. Returns (l_plus, l_minus) of this micro-batch as floats. A non-finite
        loss: with ``on_nonfinite="raise"`` FloatingPointError is raised here (weights restored, the
        step counted as skipped, its estimates dropped); with "skip", ``step_accumulated`` skips the
        update with a RuntimeWarning.
        """
        if closure is None or not callable(closure):
            raise ValueError("MeZO.accumulate needs a closure that runs a forward pass and returns the loss")
        hypers = self._hypers()
        plan = self._plan()  # validates before any weight moves
        window = self._pending_window(create=True)
        result = engine.run_step(self._strategy, plan, window["seed"], hypers, closure,
                                 rounding=self.stochastic_rounding, first=3 * window["count"], update=False,
                                 reduce_losses=self.reduce_losses)
        self._add_to_window(window, hypers, result.loss_plus, result.loss_minus)
        return result.loss_plus, result.loss_minus

    def _add_to_window(self, window, hypers, loss_plus: float, loss_minus: float) -> None:
        """Add one micro-batch's losses to the pending window; a non-finite difference marks the
        window (or, with on_nonfinite="raise", drops it and raises)."""
        window["count"] += 1
        window["loss_plus"] += loss_plus
        window["loss_minus"] += loss_minus
        grads = engine.projected_grads(loss_plus, loss_minus, hypers)
        if all(math.isfinite(g) for g in grads):
            window["grads"] = [s + g for s, g in zip(window["grads"], grads)]
            return
        window["nonfinite"] = True
        if self.on_nonfinite == "raise":
            self._window = None
            self.step_count += 1
            self.skipped_steps += 1
            weights = "unchanged" if self._strategy.name in ("exact", "paired") else "restored"
            raise FloatingPointError(
                f"MeZO step {self.step_count - 1}: non-finite loss in micro-batch {window['count'] - 1} "
                f"(l_plus={loss_plus}, l_minus={loss_minus}); parameters {weights}, step skipped")

    @torch.no_grad()
    def step_accumulated(self):
        """Apply one update from the estimates of :meth:`accumulate` and move on to the next step:

            theta <- (1 - lr * wd) * theta - lr * g_i * z,   g_i = sum_j (l_plus_j - l_minus_j) / (2 eps_i)

        with each group's lr and weight_decay as they are now (an lr scheduler stepped between steps
        applies). Then ``loss_plus``/``loss_minus`` hold the sums over the micro-batches and
        ``projected_grad(s)``, ``last_seed`` describe the step, as after :meth:`step`. Returns the
        summed loss_plus. Raises ValueError, changing nothing, if nothing was accumulated.
        """
        window = self._pending_window(create=False)
        if window is None or window["count"] == 0:
            raise ValueError("MeZO.step_accumulated: no micro-batch estimates are pending; call "
                             "accumulate(closure) for each micro-batch first")
        hypers = self._hypers()
        plan = self._plan()
        grads = list(window["grads"])
        skipped = "non-finite loss in a micro-batch" if window["nonfinite"] else None
        if skipped is None:
            skipped = engine.apply_update(plan, window["seed"], hypers, grads, pass_index=3 * window["count"],
                                          rounding=self.stochastic_rounding)
        if skipped is not None:
            grads = [float("nan")] * len(hypers)
        self._window = None
        self._record(engine.StepResult(None, window["loss_plus"], window["loss_minus"], grads, skipped),
                     window["seed"], stacklevel=4, update_pass=3 * window["count"])
        return self.loss_plus
