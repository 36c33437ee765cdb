"""fastmezo.MeZO: the MeZO optimizer (Malladi et al., 2023) as a torch.optim.Optimizer.

One ``step(closure)``:
  1. theta += eps * z            l_plus  = closure()
  2. theta -= 2 eps * z          l_minus = closure()
  3. g = (l_plus - l_minus) / (2 eps)
  4. theta <- (1 - lr * wd) * (theta + eps * z) - lr * g * z     (restore and update, one fused pass)
z is regenerated from the step's seed in every pass and never stored: three memory passes a step.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import backends
from . import functional as F
from .noise import NOISE_VERSION, check_seed, derive_seed, key_from_name, parse_noise, rounding_seed

_NO_DECAY_SUBSTRINGS = ("bias", "layer_norm", "layernorm")


def _loss_value(loss, which: str) -> float:
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


def _positive(value, what: str) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value}")
    return v


def _finite(value, what: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} must be finite, got {value}")
    return v


class MeZO(torch.optim.Optimizer):
    """Memory-efficient zeroth-order SGD with fused, in-place passes and in-kernel Philox noise.

    Args:
        params: tensors, (name, tensor) pairs, or param-group dicts (see :func:`param_groups`).
            Groups carry ``lr``, ``eps`` and ``weight_decay``.
        lr: learning rate (paper, OPT-13B full-parameter: 1e-6 or 1e-7).
        eps: perturbation scale (paper: 1e-3 full-parameter, 1e-2 LoRA, 1e-1 prefix).
        weight_decay: decoupled-from-nothing L2 term as in the reference: theta -= lr * wd * theta.
        seed: base seed (uint64). Step t perturbs along z(derive_seed(seed, t)): a run is reproducible
            from its base seed, and torch's global RNG is never touched.
        noise: "gaussian" (the paper's) or "rademacher".
        keys: "index" (tensor i of the optimizer gets noise key i) or "name" (a CRC-32 of the
            parameter's name without wrapper prefixes; needs named parameters, stable across
            re-ordering and wrappers).
        on_nonfinite: what a NaN or inf loss does. "skip" (default): the parameters are restored, the
            step is skipped with a RuntimeWarning and counted in ``skipped_steps``. "raise": the
            parameters are restored and FloatingPointError is raised. The step index advances either
            way, so the next step tries a fresh direction.
        stochastic_rounding: round float16/bfloat16 parameters stochastically in every pass (default
            True), with random bits from their own Philox stream (docs/noise.md section 8): an update
            far below one ulp (lr 1e-6 on a bf16 weight) still moves the weight by the right amount on
            average instead of being dropped by round-to-nearest. float32 parameters are unaffected.
            False rounds to nearest, like the reference implementation.
        backend: force a backend ("triton", "native", "reference"); default: automatic per device.
        perturbation: "inplace" (default): the +eps and -2 eps passes write the perturbed values into
            the stored weights and the update pass restores them. Or a perturbation provider (exact
            mode, :class:`fastmezo.exact.ExactPerturbation`, installed by
            ``fastmezo.patch(model, mode="exact")``): the forwards see W + eps z materialized per
            module, the stored weights are only read, and one pass applies the update
            theta <- (1 - lr * wd) * theta - lr * g * z (rounding bits of pass index 2).

    After each step, ``loss_plus``, ``loss_minus``, ``projected_grad`` (of the first group; the
    per-group values are in ``projected_grads``) and ``last_seed`` describe it. The list of
    (last_seed, projected_grads, lrs) over a run is enough to rebuild the weights from the base
    weights. With several groups of different eps, group i uses g_i = (l_plus - l_minus) / (2 eps_i),
    the unbiased estimate for its own scale.
    """

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 seed: int = 0, noise: str = "gaussian", keys: str = "index", on_nonfinite: str = "skip",
                 stochastic_rounding: bool = True, backend: str | None = None,
                 perturbation="inplace"):
        _finite(lr, "lr")
        _positive(eps, "eps")
        _finite(weight_decay, "weight_decay")
        if keys not in ("index", "name"):
            raise ValueError(f"keys must be 'index' or 'name', got {keys!r}")
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
        if backend is not None:
            backends.requested_backend(backend)
        self.seed = check_seed(seed)
        self.noise = parse_noise(noise)
        self.keys = keys
        self.on_nonfinite = on_nonfinite
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be True or False, got {stochastic_rounding!r}")
        self.stochastic_rounding = stochastic_rounding
        self.backend = backend
        self._provider = _perturbation_provider(perturbation)
        self.step_count = 0
        self.skipped_steps = 0
        self.loss_plus = self.loss_minus = self.projected_grad = self.last_seed = None
        self.projected_grads: list[float] = []
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    # -- bookkeeping ------------------------------------------------------------------------------
    def _tensors(self):
        """Per-tensor (tensor, name, key, group index), validated; raises before anything changes."""
        tensors, names, group_of = [], [], []
        for gi, group in enumerate(self.param_groups):
            _positive(group["eps"], f"eps of param group {gi}")
            _finite(group["lr"], f"lr of param group {gi}")
            _finite(group["weight_decay"], f"weight_decay of param group {gi}")
            group_names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], group_names):
                tensors.append(p)
                names.append(name)
                group_of.append(gi)
        if self.keys == "name":
            if any(n is None for n in names):
                raise ValueError("MeZO(keys='name') needs named parameters: pass model.named_parameters() "
                                 "or param groups built by fastmezo.param_groups")
            keys = [key_from_name(n) for n in names]
            if len(set(keys)) != len(keys):
                raise ValueError("two parameter names hash to the same noise key; use keys='index'")
        else:
            keys = list(range(len(tensors)))
        F._check_tensors(tensors, names, one_device=False)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel():
                by_device.setdefault(t.device, []).append(i)
        # Choose every device's backend before any pass, so that a device no backend can run fails
        # the step before another device's weights have moved.
        backend_of = {device: backends.select(device, self.backend) for device in by_device}
        return tensors, keys, group_of, by_device, backend_of

    def _skip_nonfinite(self, loss_plus: float, loss_minus: float, weights: str, stacklevel: int) -> None:
        """Bookkeeping of a step skipped for a non-finite loss difference (the parameters are already
        back at theta): NaN projected gradients, the counters, then FloatingPointError with
        on_nonfinite="raise", else a RuntimeWarning. ``weights`` says what happened to the parameters."""
        self.projected_grad, self.projected_grads = float("nan"), [float("nan")] * len(self.param_groups)
        self.step_count += 1
        self.skipped_steps += 1
        message = (f"MeZO step {self.step_count - 1}: non-finite loss (l_plus={loss_plus}, "
                   f"l_minus={loss_minus}); parameters {weights}, no update")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message + " (skipped)", RuntimeWarning, stacklevel=stacklevel)

    # Pass indices of a step, for the rounding bits: +eps, -2 eps, then restore (+ update).
    _PLUS, _MINUS, _RESTORE = 0, 1, 2

    def _pass(self, plan, seed: int, a_of_group, b_of_group, pass_index: int) -> None:
        tensors, keys, group_of, by_device, backend_of = plan
        round_seed = rounding_seed(seed, pass_index) if self.stochastic_rounding else None
        for device, idx in by_device.items():
            F._run([tensors[i] for i in idx], [a_of_group[group_of[i]] for i in idx],
                   [b_of_group[group_of[i]] for i in idx], seed, [keys[i] for i in idx],
                   [0] * len(idx), self.noise, backend_of[device], rounding_seed=round_seed)

    # -- the step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure):
        """Run one MeZO step. ``closure()`` computes and returns the loss (a number or scalar tensor)
        at the current weights; it is called twice, under torch.no_grad. Returns the first loss
        (at theta + eps * z), like the reference implementation."""
        if closure is None or not callable(closure):
            raise ValueError("MeZO.step needs a closure that runs a forward pass and returns the loss")
        if self._provider is not None:
            return self._step_exact(closure)
        plan = self._tensors()
        groups = self.param_groups
        eps = [g["eps"] for g in groups]
        ones = [1.0] * len(groups)
        seed = derive_seed(self.seed, self.step_count)

        self._pass(plan, seed, ones, eps, self._PLUS)
        try:
            loss_plus_obj = closure()
            loss_plus = _loss_value(loss_plus_obj, "theta + eps*z")
        except BaseException:
            self._pass(plan, seed, ones, [-e for e in eps], self._RESTORE)
            raise
        self._pass(plan, seed, ones, [-2.0 * e for e in eps], self._MINUS)
        try:
            loss_minus = _loss_value(closure(), "theta - eps*z")
        except BaseException:
            self._pass(plan, seed, ones, eps, self._RESTORE)
            raise

        self.loss_plus, self.loss_minus, self.last_seed = loss_plus, loss_minus, seed
        diff = loss_plus - loss_minus
        if not math.isfinite(diff):
            self._pass(plan, seed, ones, eps, self._RESTORE)  # restore only
            self._skip_nonfinite(loss_plus, loss_minus, "restored", stacklevel=3)
            return loss_plus_obj

        grads = [diff / (2.0 * e) for e in eps]
        a = [1.0 - g["lr"] * g["weight_decay"] for g in groups]
        b = [a_i * e - g["lr"] * gr for a_i, e, g, gr in zip(a, eps, groups, grads)]
        self._pass(plan, seed, a, b, self._RESTORE)
        self.projected_grads = grads
        self.projected_grad = grads[0] if grads else None
        self.step_count += 1
        return loss_plus_obj

    # -- gradient accumulation --------------------------------------------------------------------
    # The micro-batch estimates of the pending step, between accumulate() and step_accumulated():
    # None, or dict(step, seed, grads (one sum per group), loss_plus, loss_minus, count, nonfinite).
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
        are back at theta when it returns, also when the closure raises.

        Perturbs by +eps*z and calls ``closure()``, by -2 eps*z and calls it again, then restores
        (+eps*z). All micro-batches of a step use one z, the pending step's (seed
        ``derive_seed(seed, step_count)``), and their loss differences add up as gradients do under
        ``backward()``: scale the closure's loss by 1/k for the mean over k micro-batches.
        :meth:`step_accumulated` then applies one update with
        g_i = sum_j (l_plus_j - l_minus_j) / (2 eps_i).

        Three passes per micro-batch and one for the update (``step`` fuses the restore into the
        update: three in all for a single batch). The pending estimates are not in
        :meth:`state_dict`: save after ``step_accumulated``. Returns (l_plus, l_minus) of this
        micro-batch as floats. A non-finite loss: with ``on_nonfinite="raise"`` FloatingPointError
        is raised here (weights restored, the step counted as skipped, its estimates dropped); with
        "skip", ``step_accumulated`` skips the update with a RuntimeWarning.
        """
        if closure is None or not callable(closure):
            raise ValueError("MeZO.accumulate needs a closure that runs a forward pass and returns the loss")
        if self._provider is not None:
            return self._accumulate_exact(closure)
        plan = self._tensors()  # validates before any weight moves
        window = self._pending_window(create=True)
        eps = [g["eps"] for g in self.param_groups]
        ones = [1.0] * len(eps)
        seed = window["seed"]
        # Rounding bits (float16/bfloat16 stochastic rounding): a fresh pass index for every pass of
        # the step, micro-batch after micro-batch.
        first = 3 * window["count"]
        self._pass(plan, seed, ones, eps, first)
        try:
            loss_plus = _loss_value(closure(), "theta + eps*z")
        except BaseException:
            self._pass(plan, seed, ones, [-e for e in eps], first + 2)
            raise
        self._pass(plan, seed, ones, [-2.0 * e for e in eps], first + 1)
        try:
            loss_minus = _loss_value(closure(), "theta - eps*z")
        finally:
            self._pass(plan, seed, ones, eps, first + 2)

        self._add_to_window(window, eps, loss_plus, loss_minus, "restored")
        return loss_plus, loss_minus

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
        plan = self._tensors()
        groups = self.param_groups
        grads = list(window["grads"])
        if window["nonfinite"]:
            grads = [float("nan")] * len(groups)
        else:
            a = [1.0 - g["lr"] * g["weight_decay"] for g in groups]
            b = [-g["lr"] * gr for g, gr in zip(groups, grads)]
            self._pass(plan, window["seed"], a, b, 3 * window["count"])
        self._window = None
        self.loss_plus, self.loss_minus, self.last_seed = window["loss_plus"], window["loss_minus"], window["seed"]
        self.projected_grads = grads
        self.projected_grad = grads[0] if grads else None
        self.step_count += 1
        if window["nonfinite"]:
            self.skipped_steps += 1
            warnings.warn(f"MeZO step {self.step_count - 1}: non-finite loss in a micro-batch "
                          f"(summed l_plus={self.loss_plus}, l_minus={self.loss_minus}); parameters "
                          "restored, no update (skipped)", RuntimeWarning, stacklevel=2)
        return self.loss_plus

    # -- exact mode (fastmezo.exact) --------------------------------------------------------------
    @property
    def perturbation_mode(self) -> str:
        """"inplace", or "exact" when a perturbation provider materializes W + eps z per module (group)."""
        return "inplace" if self._provider is None else "exact"

    def _exact_plan(self):
        plan = self._tensors()
        missing = self._provider.covered(plan[0])
        if missing:
            raise ValueError(f"exact mode: tensor {missing[0]} of the optimizer is not a parameter of the "
                             "patched model, so no module would perturb it; give MeZO the model's parameters")
        return plan

    def _exact_losses(self, plan, seed, closure):
        """(loss_plus object, loss_plus, loss_minus): two forwards at W + eps z and W - eps z, with
        the stored weights only read (an exception leaves them as they were)."""
        tensors, keys, group_of = plan[0], plan[1], plan[2]
        eps = [self.param_groups[gi]["eps"] for gi in group_of]
        with self._provider.perturbation(seed, tensors, keys, eps, noise=self.noise, backend=self.backend):
            loss_plus_obj = closure()
            loss_plus = _loss_value(loss_plus_obj, "theta + eps*z")
        with self._provider.perturbation(seed, tensors, keys, [-e for e in eps], noise=self.noise,
                                         backend=self.backend):
            loss_minus = _loss_value(closure(), "theta - eps*z")
        return loss_plus_obj, loss_plus, loss_minus

    def _step_exact(self, closure):
        plan = self._exact_plan()
        groups = self.param_groups
        seed = derive_seed(self.seed, self.step_count)
        loss_plus_obj, loss_plus, loss_minus = self._exact_losses(plan, seed, closure)
        self.loss_plus, self.loss_minus, self.last_seed = loss_plus, loss_minus, seed
        diff = loss_plus - loss_minus
        if not math.isfinite(diff):
            self._skip_nonfinite(loss_plus, loss_minus, "unchanged (exact mode)", stacklevel=4)
            return loss_plus_obj
        grads = [diff / (2.0 * g["eps"]) for g in groups]
        a = [1.0 - g["lr"] * g["weight_decay"] for g in groups]
        b = [-g["lr"] * gr for g, gr in zip(groups, grads)]
        self._pass(plan, seed, a, b, self._RESTORE)   # the only pass that writes the weights
        self.projected_grads = grads
        self.projected_grad = grads[0] if grads else None
        self.step_count += 1
        return loss_plus_obj

    def _add_to_window(self, window, eps, loss_plus: float, loss_minus: float, weights: str) -> None:
        """Add one micro-batch's losses to the pending accumulation window; a non-finite difference
        marks the window (or, with on_nonfinite="raise", drops it and raises). ``weights`` says what
        happened to the parameters, for the message."""
        window["count"] += 1
        window["loss_plus"] += loss_plus
        window["loss_minus"] += loss_minus
        diff = loss_plus - loss_minus
        if math.isfinite(diff):
            window["grads"] = [s + diff / (2.0 * e) for s, e in zip(window["grads"], eps)]
            return
        window["nonfinite"] = True
        if self.on_nonfinite == "raise":
            self._window = None
            self.step_count += 1
            self.skipped_steps += 1
            raise FloatingPointError(
                f"MeZO step {self.step_count - 1}: non-finite loss in micro-batch {window['count'] - 1} "
                f"(l_plus={loss_plus}, l_minus={loss_minus}); parameters {weights}, step skipped")

    def _accumulate_exact(self, closure):
        plan = self._exact_plan()
        window = self._pending_window(create=True)
        eps = [g["eps"] for g in self.param_groups]
        _, loss_plus, loss_minus = self._exact_losses(plan, window["seed"], closure)
        self._add_to_window(window, eps, loss_plus, loss_minus, "unchanged")
        return loss_plus, loss_minus

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
        if keys not in ("index", "name"):
            raise ValueError(f"state dict has keys={keys!r}; expected 'index' or 'name'")
        step_count, skipped = int(mezo["step_count"]), int(mezo.get("skipped_steps", 0))
        if step_count < 0 or skipped < 0:
            raise ValueError(f"state dict has a negative step count ({step_count}, {skipped} skipped)")
        rounding = mezo.get("stochastic_rounding", self.stochastic_rounding)
        if not isinstance(rounding, bool):
            raise ValueError(f"state dict has stochastic_rounding={rounding!r}; expected True or False")
        super().load_state_dict(state_dict)
        self.seed, self.noise, self.keys = seed, noise, keys
        self.stochastic_rounding = rounding
        self.step_count, self.skipped_steps = step_count, skipped


def _perturbation_provider(perturbation):
    """None for in-place mode, else the exact-mode provider (checked for the two methods MeZO calls)."""
    if isinstance(perturbation, str):
        if perturbation == "inplace":
            return None
        if perturbation == "exact":
            raise ValueError("MeZO(perturbation='exact') needs the model, whose modules materialize W + eps*z: "
                             "use fastmezo.patch(model, mode='exact'), or pass "
                             "perturbation=fastmezo.exact.ExactPerturbation(model)")
        raise ValueError(f"perturbation must be 'inplace' or an exact-mode provider, got {perturbation!r}")
    if not (callable(getattr(perturbation, "perturbation", None)) and callable(getattr(perturbation, "covered", None))):
        raise TypeError(f"perturbation must be 'inplace' or a provider with perturbation() and covered() "
                        f"(fastmezo.exact.ExactPerturbation), got {type(perturbation).__name__}")
    return perturbation


def param_groups(model: torch.nn.Module, weight_decay: float = 0.0,
                 no_decay=_NO_DECAY_SUBSTRINGS, **group_options):
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
