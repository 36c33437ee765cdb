"""MeZO variants on the step engine, with inference memory: several directions per step (n-SPSA),
momentum by replay, and the one-sided estimate.

    opt = fastmezo.variants.MeZOVariant(params, lr=1e-6, eps=1e-3, directions=4)     # n-SPSA, q = 4
    opt = fastmezo.variants.MeZOVariant(params, lr=1e-6, momentum=0.9, window=8)       # momentum by replay
    opt = fastmezo.variants.MeZOVariant(params, lr=1e-6, one_sided=True)               # (l(θ+εz) - l(θ)) / ε
    loss = opt.step(closure)

A step of ``MeZOVariant`` (options combine):

  1. directions j = 0..q-1 with seeds derive_seed(seed, step, j) (direction 0 is MeZO's own seed):
     two-sided, each direction is fastmezo.engine.run_step(update=False), a transaction that leaves
     the weights at θ, g_j = (l+ - l-) / (2 ε); one-sided, l0 = l(θ) is computed once and each
     direction perturbs by +ε z_j, forwards and restores, g_j = (l(θ + ε z_j) - l0) / ε.
  2. the window keeps the last W steps' (seed_j, g_j / q), scalars only (no momentum buffer);
  3. one update over every stream of the window, step t - k weighted by momentum**k:

         θ <- (1 - lr wd) θ - lr Σ_k momentum**k Σ_j (g_{t-k,j} / q) z(seed_{t-k,j})

     On devices the Triton backend runs (CUDA) this is ONE pass over the weights for all q * W streams
     (kernels/replay.py, bit-identical to the passes one by one); elsewhere one pass per stream.
     The first pass applies the decay, the others a = 1.

Memory: the weights, the forwards, and the scalars of the window: as MeZO. A non-finite loss skips the
step (the weights were restored by the transactions) and adds nothing to the window. The update
passes are not fused with the restore as in MeZO.step: an in-place two-sided step with q = 1 and
W = 1 is MeZO's step with one more pass, and equals it up to float rounding (not bit for bit).
Variant steps are not trajectory steps: MeZOVariant refuses ``trajectory=``.
"""
from __future__ import annotations

import collections
import math

import torch

from . import engine
from .checks import nonnegative
from .noise import derive_seed, rounding_seed
from .optim import MeZO


class MeZOVariant(MeZO):
    """:class:`fastmezo.MeZO` with ``directions`` (q >= 1), ``momentum`` (0 <= beta < 1) over a window
    of ``window`` steps (W >= 1) and ``one_sided`` estimates; other arguments as MeZO."""

    def __init__(self, params, *args, directions: int = 1, momentum: float = 0.0, window: int = 1,
                 one_sided: bool = False, **kwargs):
        if kwargs.get("trajectory") not in (None, False):
            raise ValueError("MeZOVariant steps are not MeZO steps: a trajectory cannot record them")
        for name, value in (("directions", directions), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if nonnegative(momentum, "momentum") >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not isinstance(one_sided, bool):
            raise TypeError(f"one_sided must be True or False, got {one_sided!r}")
        super().__init__(params, *args, **kwargs)
        self.directions, self.momentum, self.window, self.one_sided = directions, float(momentum), window, one_sided
        #: (seed, [g / q per group]) of the last ``window`` steps' directions, newest last
        self.history: collections.deque = collections.deque(maxlen=window)

    @torch.no_grad()
    def step(self, closure):
        if closure is None or not callable(closure):
            raise ValueError("MeZOVariant.step needs a closure that runs a forward pass and returns the loss")
        hypers = self._hypers()
        plan = self._plan()
        q = self.directions
        seeds = [derive_seed(self.seed, self.step_count, j) for j in range(q)]
        loss0 = engine.loss_value(closure(), "theta") if self.one_sided else None
        grads, first_plus, first_minus = [], None, None
        for seed in seeds:
            if self.one_sided:
                loss_plus, loss_minus = self._one_sided_forward(plan, seed, hypers, closure), loss0
                if self.reduce_losses is not None:
                    loss_plus, loss_minus = self.reduce_losses(loss_plus, loss_minus)
                g = [(loss_plus - loss_minus) / h.eps for h in hypers]
            else:
                result = engine.run_step(self._strategy, plan, seed, hypers, closure,
                                         rounding=self.stochastic_rounding, update=False,
                                         reduce_losses=self.reduce_losses)
                g, loss_plus, loss_minus = result.grads, result.loss_plus, result.loss_minus
            if first_plus is None:
                first_plus, first_minus = loss_plus, loss_minus
            grads.append(g)
        mean = [sum(g[i] for g in grads) / q for i in range(len(hypers))]
        skipped = None if all(math.isfinite(x) for g in grads for x in g) else "non-finite loss"
        if skipped is None:
            self.history.append([(seed, [x / q for x in g]) for seed, g in zip(seeds, grads)])
            skipped = self._update(plan, hypers, seeds[0])
        self._record(engine.StepResult(first_plus, first_plus, first_minus,
                                       mean if skipped is None else [float("nan")] * len(hypers), skipped),
                     seeds[0], stacklevel=4, update_pass=engine.RESTORE)
        return first_plus

    def _one_sided_forward(self, plan, seed, hypers, closure) -> float:
        """l(θ + ε z) with the weights back at θ afterwards (exact mode: never moved)."""
        eps = [h.eps for h in hypers]
        if isinstance(self._strategy, engine.Exact):
            with self._strategy.provider.perturbation(plan, seed, eps):
                return engine.loss_value(closure(), "theta + eps*z")
        rounding = engine.rounding_passes(self.stochastic_rounding)[0]
        plan.run(seed, [1.0] * len(eps), eps, round_seed=rounding_seed(seed, engine.PLUS) if rounding else None)
        try:
            return engine.loss_value(closure(), "theta + eps*z")
        finally:
            plan.run(seed, [1.0] * len(eps), [-e for e in eps],
                     round_seed=rounding_seed(seed, engine.RESTORE) if rounding else None)

    def _update(self, plan, hypers, seed0) -> str | None:
        """The window's streams, newest first, as (seed, a per group, b per group, round seed) passes;
        refused (None returned otherwise) when a coefficient would overflow."""
        passes = []
        rounding = engine.rounding_passes(self.stochastic_rounding)[1]
        for k, entry in enumerate(reversed(self.history)):
            weight = self.momentum ** k
            for seed, gq in entry:
                a = [1.0 - h.lr * h.weight_decay if not passes else 1.0 for h in hypers]
                b = [-h.lr * weight * g for h, g in zip(hypers, gq)]
                rs = rounding_seed(seed0, 3 * self.directions + len(passes)) if rounding else None
                passes.append((seed, a, b, rs))
        try:
            for _, a, b, _ in passes:
                plan.check_coefficients(a, b, "the update")
        except OverflowError as exc:
            self.history.pop()
            return f"update refused: {exc}"
        from .replayer import fused_available, _run_fused
        if fused_available(plan):
            _run_fused(plan, [(seed, [(a, b, rs)]) for seed, a, b, rs in passes], len(passes))
        else:
            for seed, a, b, rs in passes:
                plan.run(seed, a, b, round_seed=rs)
        return None
