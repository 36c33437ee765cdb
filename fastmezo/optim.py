"""fastmezo.MeZO: the MeZO optimizer (Malladi et al., 2023) as a torch.optim.Optimizer.

One ``step(closure)``:
  1. theta += eps * z            l_plus  = closure()
  2. theta -= 2 eps * z          l_minus = closure()
  3. g = (l_plus - l_minus) / (2 eps)
  4. theta <- (1 - lr * wd) * (theta + eps * z) - lr * g * z     (restore and update, one fused pass)
z is regenerated from the step's seed in every pass and never stored: three memory passes a step.
"""
from __future__ import annotations

import warnings

import torch

from . import backends, engine
from .engine import NO_DECAY
from .noise import NOISE_VERSION, check_seed, derive_seed, parse_noise
from .accumulation import MicroBatches
from .checks import nonnegative, positive
from .plan import Plan

KEY_MODES = ("auto", "name", "index")

class MeZO(MicroBatches, torch.optim.Optimizer):
    """Memory-efficient zeroth-order SGD with fused, in-place passes and in-kernel Philox noise.

    Args:
        params: tensors, (name, tensor) pairs, or param-group dicts (see :func:`param_groups`).
            Groups carry ``lr``, ``eps`` and ``weight_decay``.
        lr: learning rate, >= 0 (paper, OPT-13B full-parameter: 1e-6 or 1e-7).
        eps: perturbation scale (paper: 1e-3 full-parameter, 1e-2 LoRA, 1e-1 prefix).
        weight_decay: L2 term as in the reference, >= 0: theta -= lr * wd * theta.
        seed: base seed (uint64). Step t perturbs along z(derive_seed(seed, t)): a run is reproducible
            from its base seed, and torch's global RNG is never touched.
        noise: "gaussian" (the paper's) or "rademacher".
        keys: how each tensor's noise key is made. "auto" (default): from the parameter's name when
            every tensor has one (named parameters or :func:`param_groups`), else from its position.
            "name": a CRC-32 of the name without wrapper prefixes (DDP's ``module.``, PEFT's
            ``base_model.model.``, torch.compile's ``_orig_mod.``), so z does not change when the model
            is wrapped, re-ordered or sharded: the reason names are the default. "index": tensor i of
            the optimizer gets key i (the only identity unnamed tensors have).
        on_nonfinite: what a NaN or inf loss does. "skip" (default): the parameters are restored, the
            step is skipped with a RuntimeWarning and counted in ``skipped_steps``. "raise": the
            parameters are restored and FloatingPointError is raised. The step index advances either
            way, so the next step tries a fresh direction.
        stochastic_rounding: "update" (default): round float16/bfloat16 parameters stochastically in the
            update pass, with random bits from their own Philox stream (docs/noise.md section 8): an
            update far below one ulp (lr 1e-6 on a bf16 weight) still moves the weight by the right
            amount on average instead of being dropped by round-to-nearest; the perturbation passes
            round to nearest. True: stochastically in every pass (the perturbation passes too: they
            drift no less, and each costs more). False: round to nearest, like the
            reference implementation. float32 parameters are unaffected.
        backend: force a backend ("triton", "native", "oracle"); default: automatic per device.
        perturbation: "inplace" (default): the +eps and -2 eps passes write the perturbed values into
            the stored weights and the update pass restores them. Or a perturbation provider (exact
            mode, :class:`fastmezo.exact.ExactPerturbation`, installed by
            ``fastmezo.patch(model, mode="exact")``): the forwards see W + eps z materialized per
            module, the stored weights are only read, and one pass applies the update
            theta <- (1 - lr * wd) * theta - lr * g * z (rounding bits of pass index 2).
        trajectory: None, True, a file path, or a fastmezo.Trajectory: record every step (seed, projected
            gradients, lr, wd, eps, rounding) beside a sha256 of the parameters as given now, so
            ``fastmezo.replay(base, trajectory)`` rebuilds the trained weights (a path: appended step by
            step, JSON lines; fastmezo.trajectory).

    After each step, ``loss_plus``, ``loss_minus``, ``projected_grad`` (of the first group; the
    per-group values are in ``projected_grads``) and ``last_seed`` describe it. The list of
    (last_seed, projected_grads, lrs) over a run is enough to rebuild the weights from the base
    weights. With several groups of different eps, group i uses g_i = (l_plus - l_minus) / (2 eps_i),
    the unbiased estimate for its own scale.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 seed: int = 0, noise: str = "gaussian", keys: str = "auto", on_nonfinite: str = "skip",
                 stochastic_rounding="update", backend: str | None = None,
                 perturbation="inplace", trajectory=None):
        nonnegative(lr, "lr")
        positive(eps, "eps")
        nonnegative(weight_decay, "weight_decay")
        if keys not in KEY_MODES:
            raise ValueError(f"keys must be one of {', '.join(map(repr, KEY_MODES))}, got {keys!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        backends.requested(backend)     # the name is checked now; the backend itself at the first step
        self.seed = check_seed(seed)
        self.noise = parse_noise(noise)
        self.keys = keys
        self.on_nonfinite = on_nonfinite
        self.stochastic_rounding = engine.check_rounding(stochastic_rounding)
        self.backend = backend
        self._strategy = _strategy(perturbation)
        self._cached_plan = None
        #: None, or ``f(l_plus, l_minus) -> (l_plus, l_minus)`` combining the losses of several
        #: processes before the projected gradient is formed (set by fastmezo's distributed support).
        self.reduce_losses = None
        self.step_count = 0
        self.skipped_steps = 0
        self.loss_plus = self.loss_minus = self.projected_grad = self.last_seed = None
        self.projected_grads: list[float] = []
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        self._hypers()          # every group's own options, checked now rather than at the first step
        #: None, or the fastmezo.trajectory.Trajectory recording every step (``trajectory=True``: a new
        #: one whose base weights are the parameters as given now; a path: the same, appended to that
        #: file step by step; a Trajectory: continued, e.g. after fastmezo.replay for a resume).
        self.trajectory = None
        if trajectory is not None and trajectory is not False:
            import os

            from .trajectory import Trajectory
            if not isinstance(trajectory, Trajectory):
                if not (trajectory is True or isinstance(trajectory, (str, os.PathLike))):
                    raise TypeError(f"trajectory must be True, a file path or a fastmezo.trajectory.Trajectory, "
                                    f"got {type(trajectory).__name__}")
                trajectory = Trajectory.of_optimizer(self, path=None if trajectory is True else trajectory)
            elif trajectory.header["strategy"] != self._strategy.name:
                raise ValueError(f"the trajectory was recorded in {trajectory.header['strategy']} mode, this "
                                 f"optimizer runs in {self._strategy.name} mode")
            self.trajectory = trajectory

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with the new group's options checked before it is added."""
        engine.group_hyper({**self.defaults, **param_group}, len(self.param_groups))
        super().add_param_group(param_group)

    # -- the plan of the parameter set ------------------------------------------------------------
    def _hypers(self):
        """Each group's lr, eps and weight_decay, validated as real numbers before any weight moves."""
        return [engine.group_hyper(group, gi) for gi, group in enumerate(self.param_groups)]

    def _plan(self) -> Plan:
        """The validated plan of the optimizer's tensors, built once and rebuilt only when the tensors
        changed (another parameter set, a ``.to()``/``.half()`` that moved their data)."""
        tensors, names, groups = [], [], []
        for gi, group in enumerate(self.param_groups):
            group_names = group.get("param_names") or [None] * len(group["params"])
            tensors += group["params"]
            names += group_names
            groups += [gi] * len(group["params"])
        plan = self._cached_plan
        if plan is None or plan.groups != groups or plan.names != names or not plan.is_current(tensors):
            named = all(n is not None for n in names)
            if self.keys == "name" and not named:
                raise ValueError("MeZO(keys='name') needs named parameters: pass model.named_parameters() "
                                 "or param groups built by fastmezo.param_groups")
            keys = "name" if self.keys == "name" or (self.keys == "auto" and named) else "index"
            plan = Plan(tensors, names, keys=keys, groups=groups, noise=self.noise, backend=self.backend,
                        one_device=False)
            self._strategy.check(plan)
            self._cached_plan = plan
        return plan

    def _record(self, result: engine.StepResult, seed: int, stacklevel: int, update_pass: int):
        """Bookkeeping after a step: the losses and projected gradients, the trajectory's record, the
        counters, and a skipped step's warning (or FloatingPointError with on_nonfinite="raise").
        ``update_pass``: the pass index of the update (a plain step's is engine.RESTORE; an accumulated
        step's 3 * micro-batches)."""
        self.loss_plus, self.loss_minus, self.last_seed = result.loss_plus, result.loss_minus, seed
        if self.trajectory is not None:
            self.trajectory.record(self._cached_plan, self.step_count, seed, result.grads, self._hypers(),
                                   noise=self.noise.name.lower(), rounding=self.stochastic_rounding,
                                   update_pass=update_pass, skipped=result.skipped)
        self.projected_grads = list(result.grads)
        self.projected_grad = self.projected_grads[0] if self.projected_grads else None
        self.step_count += 1
        if result.skipped is None:
            return
        self.skipped_steps += 1
        weights = "unchanged" if self._strategy.name in ("exact", "paired") else "restored"
        message = (f"MeZO step {self.step_count - 1}: {result.skipped} (l_plus={result.loss_plus}, "
                   f"l_minus={result.loss_minus}); parameters {weights}, no update")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=stacklevel)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure):
        """Run one MeZO step. ``closure()`` computes and returns the loss (a number or scalar tensor)
        at the current weights; it is called twice, under torch.no_grad. Returns the first loss
        (at theta + eps * z), like the reference implementation. A step is a transaction: if anything
        raises, the parameters are back where the step found them."""
        if closure is None or not callable(closure):
            raise ValueError("MeZO.step needs a closure that runs a forward pass and returns the loss")
        hypers = self._hypers()
        plan = self._plan()
        seed = derive_seed(self.seed, self.step_count)
        result = engine.run_step(self._strategy, plan, seed, hypers, closure, rounding=self.stochastic_rounding,
                                 reduce_losses=self.reduce_losses)
        self._record(result, seed, stacklevel=4, update_pass=engine.RESTORE)
        return result.loss_plus_obj

    # -- gradient accumulation --------------------------------------------------------------------
    # The micro-batch estimates of the pending step, between accumulate() and step_accumulated():
    # None, or dict(step, seed, grads (one sum per group), loss_plus, loss_minus, count, nonfinite).
    @property
    def perturbation_mode(self) -> str:
        """"inplace", or "exact" when a perturbation provider materializes W + eps z per module (group)."""
        return self._strategy.name

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self):
        """The torch state dict plus fastmezo's own state (base seed, step count, noise)."""
        sd = super().state_dict()
        sd["mezo"] = dict(seed=self.seed, step_count=self.step_count, skipped_steps=self.skipped_steps,
                          noise=self.noise.name.lower(), keys=self.keys, noise_version=NOISE_VERSION,
                          stochastic_rounding=self.stochastic_rounding)
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict from :meth:`state_dict`; a resumed run follows the same trajectory."""
        state_dict = dict(state_dict)
        mezo = state_dict.pop("mezo", None)
        if mezo is None:
            raise ValueError("this state dict was not written by fastmezo.MeZO (no 'mezo' entry)")
        if mezo.get("noise_version") != NOISE_VERSION:
            raise ValueError(f"state dict uses noise contract v{mezo.get('noise_version')}, this fastmezo "
                             f"implements v{NOISE_VERSION}: the run cannot be resumed bit for bit")
        # Validate fastmezo's own entry before torch loads anything, so a rejected state dict leaves
        # the optimizer as it was.
        seed = check_seed(mezo["seed"])
        noise = parse_noise(mezo["noise"])
        keys = mezo.get("keys", self.keys)
        if keys not in KEY_MODES:
            raise ValueError(f"state dict has keys={keys!r}; expected one of {', '.join(map(repr, KEY_MODES))}")
        step_count, skipped = int(mezo["step_count"]), int(mezo.get("skipped_steps", 0))
        if step_count < 0 or skipped < 0:
            raise ValueError(f"state dict has a negative step count ({step_count}, {skipped} skipped)")
        rounding = mezo.get("stochastic_rounding", self.stochastic_rounding)
        if not engine.is_rounding_mode(rounding):
            raise ValueError(f'state dict has stochastic_rounding={rounding!r}; expected "update", True or False')
        super().load_state_dict(state_dict)
        self.seed, self.noise, self.keys = seed, noise, keys
        self.stochastic_rounding = rounding
        self.step_count, self.skipped_steps = step_count, skipped
        self._cached_plan = None


def _strategy(perturbation):
    """The step engine's strategy: in place, or exact mode with its provider (checked for the two
    methods the engine calls)."""
    if isinstance(perturbation, str):
        if perturbation == "inplace":
            return engine.InPlace()
        if perturbation == "exact":
            raise ValueError("MeZO(perturbation='exact') needs the model, whose modules materialize W + eps*z: "
                             "use fastmezo.patch(model, mode='exact'), or pass "
                             "perturbation=fastmezo.exact.ExactPerturbation(model)")
        raise ValueError(f"perturbation must be 'inplace' or an exact-mode provider, got {perturbation!r}")
    if not (callable(getattr(perturbation, "perturbation", None)) and callable(getattr(perturbation, "covered", None))):
        raise TypeError(f"perturbation must be 'inplace' or a provider with perturbation() and covered() "
                        f"(fastmezo.exact.ExactPerturbation), got {type(perturbation).__name__}")
    if getattr(perturbation, "mode", None) == "paired":      # fastmezo.paired: both forwards in one
        return engine.Paired(perturbation)
    return engine.Exact(perturbation)


def param_groups(model: torch.nn.Module, weight_decay: float = 0.0,
                 no_decay=NO_DECAY, **group_options):
    """Param groups for :class:`MeZO` over the trainable (requires_grad) parameters of ``model``,
    with weight decay skipped on bias and normalization parameters.

    The reference rule skips parameters whose name contains "bias", "layer_norm" or "layernorm";
    parameters of any module whose class name contains "Norm" (LayerNorm, RMSNorm, GroupNorm, ...)
    are skipped too, so models that name their norms differently (Llama's "input_layernorm" is
    covered by name, "norm" by type) get the same treatment. Groups hold (name, tensor) pairs;
    ``group_options`` (lr, eps) are copied into both groups.
    """
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__
                   for p in m.parameters(recurse=False)}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if id(p) in norm_params or any(s in lowered for s in no_decay):
            plain.append((name, p))
        else:
            decay.append((name, p))
    groups = []
    if decay:
        groups.append(dict(params=decay, weight_decay=weight_decay, **group_options))
    if plain:
        groups.append(dict(params=plain, weight_decay=0.0, **group_options))
    if not groups:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    return groups
