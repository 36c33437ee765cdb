"""How each implementation timed by the step benchmarks takes a MeZO step on a model: the baseline (the
paper's trainer, bench/baseline.py) and fastmezo's variants, in place or exact mode, rounding to
nearest (rn), stochastically in every pass (sr), or stochastically in the update pass only (update,
MeZO's default; in exact mode the update is the only pass, so exact-sr is that too).

Exact mode is patched for its variant only (``fastmezo_variant``, a context manager); on exit the model
must be as before patching (``verify_restored``): every module holds its own parameter objects again,
the hook dictionaries are unchanged and no attribute of ``fastmezo.patch`` is left.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from bench.baseline import baseline_step
from bench.common import BASELINE_SEED, FASTMEZO_SEED
from bench.models import trainable

# The paper's MeZO hyper-parameters for OPT-13B full-parameter fine-tuning. They do not change the
# speed; an lr this small keeps the random weights sane over many timed steps.
EPS = 1e-3
LR = 1e-6
WEIGHT_DECAY = 0.0
# fastmezo's step t uses derive_seed(FASTMEZO_SEED, t); the baseline's step t torch.manual_seed(BASELINE_SEED + t).

#: The fastmezo variants: name -> (perturbation mode, stochastic_rounding).
VARIANTS = {"inplace-rn": ("inplace", False), "inplace-update": ("inplace", "update"), "inplace-sr": ("inplace", True),
            "exact-rn": ("exact", False), "exact-sr": ("exact", True)}
# fastmezo.trajectory.ROUNDING_NAMES, written out: the bench also times fastmezo versions without it.
ROUNDING_NAMES = {False: "nearest", "update": "update", True: "stochastic"}


def parse_variants(text: str) -> list[str]:
    """'exact-sr,inplace-rn' -> ['inplace-rn', 'exact-sr'] (VARIANTS order, duplicates dropped); 'all' is
    all of them. Raises ValueError naming an unknown variant."""
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    if "all" in names:
        names = [v for v in names if v != "all"] + list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r}; expected a comma-separated subset of "
                         f"{', '.join(VARIANTS)} (or 'all')")
    if not names:
        raise ValueError("--variants is empty")
    return [v for v in VARIANTS if v in names]


def variants_of_rounding(rounding: str | None) -> list[str]:
    """The variants --rounding selects: all for None, else those of that rounding."""
    return [v for v, (_, sr) in VARIANTS.items() if rounding is None or ROUNDING_NAMES[sr] == rounding]


def variant_rounding(variant: str) -> str:
    """'nearest', 'update' or 'stochastic'."""
    return ROUNDING_NAMES[VARIANTS[variant][1]]


def variant_mode(variant: str) -> str:
    """'inplace' or 'exact'."""
    return VARIANTS[variant][0]


def inplace_twin(variant: str) -> str:
    """The in-place variant with the same rounding (the exact rows' yardstick)."""
    return "inplace-" + variant.split("-", 1)[1]


def rounding_kwargs(rounding: str | None) -> dict:
    """MeZO keyword arguments for a rounding: {} for MeZO's own default (None), else
    ``stochastic_rounding`` True / "update" / False; a clear error where this fastmezo has no such option."""
    if rounding is None:
        return {}
    import fastmezo

    if "stochastic_rounding" not in inspect.signature(fastmezo.MeZO).parameters:
        raise SystemExit(f"--rounding {rounding}: this fastmezo.MeZO has no stochastic_rounding option")
    return {"stochastic_rounding": {name: mode for mode, name in ROUNDING_NAMES.items()}[rounding]}


def rounding_of(opt) -> str:
    """How a MeZO optimizer rounds its low-precision stores: "stochastic", "update" or "nearest"."""
    return ROUNDING_NAMES[getattr(opt, "stochastic_rounding", False)]


def make_optimizer(model: torch.nn.Module, backend: str, rounding: str | None = None, seed: int = FASTMEZO_SEED):
    """fastmezo.MeZO over the model's trainable parameters, weight decay skipped on bias and norm
    parameters as in the baseline; rounding None keeps MeZO's default."""
    import fastmezo

    groups = fastmezo.param_groups(model, weight_decay=WEIGHT_DECAY, lr=LR, eps=EPS)
    return fastmezo.MeZO(groups, lr=LR, eps=EPS, seed=seed, backend=backend, **rounding_kwargs(rounding))


def model_hooks_state(model: torch.nn.Module) -> dict:
    """What exact mode changes and must give back: every module's own parameter objects, its forward
    (pre-)hook dictionaries, and the instance attributes fastmezo.patch adds. Holds references to the
    model's own parameters only (no copies)."""
    return {"params": [(m, n, p) for m in model.modules() for n, p in m._parameters.items()],
            "hooks": [(m, tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
                       tuple(getattr(m, "_forward_hooks_always_called", {}))) for m in model.modules()],
            "attrs": sorted(k for k in ("mezo_step", "_fastmezo_patch") if k in model.__dict__)}


def verify_restored(model: torch.nn.Module, before: dict, what: str = "exact mode", exact=None) -> dict:
    """Raise RuntimeError unless the model is as ``before`` (model_hooks_state) says: the same parameter
    object in every module (no perturbed copy left swapped in), the same hook dictionaries (exact
    mode's hooks gone), no attribute of fastmezo.patch; and, for an exact-mode provider, no copy alive
    and no hook active. Returns a small record of what was checked."""
    problems = []
    moved = [n for m, n, p in before["params"] if m._parameters.get(n) is not p]
    if moved:
        problems.append(f"{len(moved)} module parameters are not the stored tensors again (e.g. {moved[0]!r})")
    now = model_hooks_state(model)
    if [h[1:] for h in now["hooks"]] != [h[1:] for h in before["hooks"]]:
        extra = sum(len(a[1]) + len(a[2]) - len(b[1]) - len(b[2]) for a, b in zip(now["hooks"], before["hooks"]))
        problems.append(f"forward hooks differ from before ({extra:+d} hooks)")
    if now["attrs"] != before["attrs"]:
        problems.append(f"attributes {now['attrs']} left on the model (before: {before['attrs']})")
    if exact is not None and (exact.active or exact.live_tensors):
        problems.append(f"the exact-mode provider is still active ({exact.live_tensors} copies alive)")
    if problems:
        raise RuntimeError(f"{what} did not leave the model as it was: " + "; ".join(problems))
    return {"params_checked": len(before["params"]), "hooks": sum(len(h[1]) + len(h[2]) for h in now["hooks"])}


@contextlib.contextmanager
def fastmezo_variant(model: torch.nn.Module, variant: str, backend: str, optimizers: dict | None = None,
                     seed: int = FASTMEZO_SEED, group_bytes: int | None = None):
    """Yields (optimizer, exact provider or None) for one variant on ``model``. In-place: the optimizer
    of ``optimizers[variant]`` (made and stored there if missing). Exact: ``fastmezo.patch(model,
    mode="exact", ...)`` as a context manager, removed on exit, after which verify_restored runs;
    index keys and the hyper-parameters of make_optimizer, so the variants differ only in the mode and
    the rounding. ``group_bytes``: exact mode's group budget (None = fastmezo's default)."""
    import fastmezo

    mode, stochastic = VARIANTS[variant]
    rounding = ROUNDING_NAMES[stochastic]
    if mode == "inplace":
        optimizers = {} if optimizers is None else optimizers
        if variant not in optimizers:
            optimizers[variant] = make_optimizer(model, backend, rounding, seed)
        yield optimizers[variant], None
        return
    before = model_hooks_state(model)
    with fastmezo.patch(model, mode="exact", lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY, seed=seed, keys="index",
                        backend=backend, group_bytes=group_bytes, **rounding_kwargs(rounding)) as handle:
        yield handle.optimizer, handle.exact
    verify_restored(model, before, f"exact mode ({variant})", handle.exact)


class BaselineStepper:
    """The baseline step (bench/baseline.py) over the model's trainable parameters, with a fresh torch
    seed per step, as the paper's trainer draws one."""

    def __init__(self, model: torch.nn.Module, seed: int = BASELINE_SEED):
        named = trainable(model)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.seed = seed
        self.steps = 0
        self.last_loss = self.last_projected_grad = None

    def step(self, closure):
        loss, grad = baseline_step(self.params, self.names, closure, self.seed + self.steps, EPS, LR, WEIGHT_DECAY)
        self.steps += 1
        self.last_loss, self.last_projected_grad = float(loss), grad
        return loss
