"""Which MeZO frontends ``use_fastmezo`` accepts, and in which modes, read from a trainer's ``args`` and
attributes the way the real trainers read them (the findings are tabled in docs/frontends.md).

Two frontends are known, told apart by ``args.trainer``, the field both training loops dispatch on:

* the paper's trainer (princeton-nlp/MeZO, large_models/trainer.py): ``args.trainer == "zo"``.
  ``zo_step`` perturbs (+1, -2, +1 eps along z) and sets ``projected_grad``; ``zo_update`` draws z
  again and applies ``theta -= lr * (projected_grad * z + wd * theta)`` (no wd on bias / layer norm
  names), then steps the lr scheduler.
* ZO-Bench (ZO-Bench/ZO-LLM, zo-bench/trainer.py): ``args.trainer`` in zo_sgd, zo_sign_opt, zo_adam,
  zo_conserv, forward_grad. Its step methods apply the update themselves through
  ``self.optimizer.step()`` with ``param.grad = projected_grad * z / q``; its ``zo_update`` only steps
  the scheduler.

Under torch.distributed (:func:`process_group`) the steps are data parallel; FSDP2 (DTensor)
parameters are refused (:func:`refuse_dtensors`).

Every value is checked as a number (``numbers.Real``, bool refused): a string such as "1e-3" from a
YAML config is refused before anything is perturbed.
"""
from __future__ import annotations

import inspect
import numbers
import re
from dataclasses import dataclass

import torch

from .. import checks
from ..plan import _is_dtensor

PAPER = "the paper's trainer (princeton-nlp/MeZO)"
ZO_BENCH = "ZO-Bench's trainer"

_ZO_BENCH_TRAINERS = ("zo_sgd", "zo_sign_opt", "zo_adam", "zo_conserv", "forward_grad")
_WHY_NOT = {
    "zo_adam": "Adam keeps two moments per weight, state fastmezo's passes do not hold",
    "zo_conserv": "the conservative step (extra forwards choosing among three updates) is not "
                  "implemented by the adapter",
    "forward_grad": "it is a forward-mode gradient (jvp), not a two-point estimate",
}

# Methods the adapter replaces with fastmezo's passes, and methods that draw z in modes it refuses
# (replaced by ones that raise, so that nothing can run them with torch's z while switched).
REPLACED = {PAPER: ("zo_step", "zo_perturb_parameters", "zo_update"),
            ZO_BENCH: ("zo_step", "zo_step_v1", "zo_perturb_parameters")}
GUARDED = {PAPER: (),
           ZO_BENCH: ("zo_step_v2", "zo_conserv_step", "forward_grad_step",
                      "zo_step_with_module_wise_perturbation",
                      "zo_step_with_module_wise_perturbation_coordinate")}
# Methods of the real trainers that look like ZO methods but draw no z.
KEPT = {PAPER: ("zo_forward", "zo_forward_nondiff"),
        ZO_BENCH: ("zo_forward", "zo_forward_nondiff", "zo_update", "forward_grad_update",
                   "gradient_update", "training_step", "get_grad_sparsity_by_name",
                   "grouped_module_iter", "functional_call_loss")}
_ZO_LIKE_NAME = re.compile(r"zo|perturb|_step|step_|update|forward_grad")
_DRAWS_NOISE = re.compile(r"torch\.(normal|randn|randn_like|rand|rand_like|manual_seed)\b|\.normal_\(")


@dataclass(frozen=True)
class Mode:
    """What a step of the switched trainer does."""
    frontend: str
    eps: float
    q: int = 1                  # directions a step (ZO-Bench's zo_step_v1 when > 1)
    one_sided: bool = False     # ZO-Bench perturbation_mode "one_side": f(theta + eps z) - f(theta)
    sign: bool = False          # zo_sign_opt: the update uses sign(projected_grad)


def real(value, what: str, *, positive: bool = False) -> float:
    """``value`` as a finite float (fastmezo.checks' rules: strings and bools refused by name)."""
    return checks.positive(value, what) if positive else checks.real(value, what)


def seed_of(value, what: str = "zo_random_seed") -> int:
    """A step's seed as the trainers draw it (np.random.randint: an int, numpy's included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TypeError(f"{what} must be a non-negative int, got {value!r} ({type(value).__name__})")
    return int(value)


def _field(args, name: str, frontend: str):
    if not hasattr(args, name):
        raise TypeError(f"the trainer's args have no {name!r}, which {frontend} reads")
    return getattr(args, name)


def _refuse(option: str, value, why: str):
    raise ValueError(f"use_fastmezo does not support {option}={value!r}: {why}")


def read_mode(trainer) -> Mode:
    """The mode the trainer's options select, or an error naming the first option the adapter does
    not reproduce exactly. Reads only; called when switching and again at every replaced step."""
    args = getattr(trainer, "args", None)
    if args is None:
        raise TypeError(f"{type(trainer).__name__} has no 'args': it is not a MeZO trainer that "
                        "use_fastmezo knows")
    kind = _field(args, "trainer", "a MeZO trainer")
    if kind == "zo":
        frontend = PAPER
    elif kind in _ZO_BENCH_TRAINERS:
        frontend = ZO_BENCH
    else:
        _refuse("args.trainer", kind, "it is not a zeroth-order mode of a trainer fastmezo knows "
                "('zo' for the paper's trainer; 'zo_sgd' or 'zo_sign_opt' for ZO-Bench's)")
    accumulation = _field(args, "gradient_accumulation_steps", frontend)
    if accumulation != 1:
        _refuse("args.gradient_accumulation_steps", accumulation,
                "both trainers support only 1 (they assert it in the middle of the step)")
    eps = real(_field(args, "zo_eps", frontend), "args.zo_eps", positive=True)
    if frontend == PAPER:
        real(_field(args, "weight_decay", frontend), "args.weight_decay")
        return Mode(PAPER, eps)

    if kind in _WHY_NOT:
        _refuse("args.trainer", kind, _WHY_NOT[kind])
    momentum = real(_field(args, "momentum", frontend), "args.momentum")
    if momentum != 0:
        _refuse("args.momentum", momentum, "SGD momentum keeps a buffer per weight; fastmezo's passes "
                "reproduce plain SGD only")
    if kind == "zo_sign_opt" and _field(args, "optimizer", frontend) != "sgd":
        _refuse("args.optimizer", args.optimizer, "zo_sign_opt then steps Adam/AdamW; only 'sgd' is "
                "reproduced")
    q = _field(args, "q", frontend)
    if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 1:
        raise TypeError(f"args.q must be an int >= 1, got {q!r} ({type(q).__name__})")
    sparsity = _field(args, "gradient_sparsity", frontend)
    if sparsity is not None:
        _refuse("args.gradient_sparsity", sparsity, "the sparse mask is drawn from torch's generator "
                "and fastmezo's passes perturb every element")
    if getattr(trainer, "gradient_sparsity", None) is not None:
        _refuse("trainer.gradient_sparsity", trainer.gradient_sparsity, "sparse masks are not reproduced")
    if _field(args, "module_wise_perturbation", frontend):
        _refuse("args.module_wise_perturbation", args.module_wise_perturbation,
                "module-wise perturbation is not implemented by the adapter")
    # As ZO-Bench reads it: any value other than "one_side" runs the two-sided estimate.
    one_sided = _field(args, "perturbation_mode", frontend) == "one_side"
    return Mode(ZO_BENCH, eps, int(q), one_sided, kind == "zo_sign_opt")


def _own_methods(trainer) -> dict:
    """name -> function for the methods the trainer's classes define, outside Hugging Face's Trainer."""
    found = {}
    for cls in type(trainer).__mro__:
        if cls is object or cls.__module__.split(".")[0] == "transformers":
            continue
        for name, value in vars(cls).items():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value) and name not in found:
                found[name] = value
    return found


def check_methods(trainer, frontend: str) -> None:
    """Refuse a trainer with a method that may draw z and that the adapter neither replaces nor knows
    to be free of z: an unknown ZO-like name, or a kept method whose source draws torch noise."""
    changed = set(REPLACED[frontend]) | set(GUARDED[frontend])
    for name, function in _own_methods(trainer).items():
        if name in changed or name.startswith("__"):
            continue
        if _ZO_LIKE_NAME.search(name) and name not in KEPT[frontend]:
            raise ValueError(f"{type(trainer).__name__} defines {name}(), which {frontend} does not have; "
                             "use_fastmezo cannot tell whether it draws z its own way, so it refuses")
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        if _DRAWS_NOISE.search(source):
            raise ValueError(f"{type(trainer).__name__}.{name}() draws torch random numbers and "
                             "use_fastmezo does not replace it: its z would differ from fastmezo's")


def process_group(data_parallel):
    """(whether steps are data parallel, the process group) for ``use_fastmezo(data_parallel=...)``."""
    dist = torch.distributed
    running = dist.is_available() and dist.is_initialized()
    if data_parallel is None:
        return running and dist.get_world_size() > 1, None
    if data_parallel is False:
        return False, None
    if not running:
        raise RuntimeError("use_fastmezo(data_parallel=...) needs torch.distributed initialized: call "
                           "torch.distributed.init_process_group() first (torchrun sets the environment)")
    if data_parallel is True:
        return True, None
    if not isinstance(data_parallel, dist.ProcessGroup):
        raise TypeError(f"data_parallel must be None, True, False or a torch.distributed.ProcessGroup, got "
                        f"{type(data_parallel).__name__}")
    return True, data_parallel


def refuse_dtensors(named_params) -> None:
    for name, p in named_params:
        if _is_dtensor(p):
            raise ValueError(f"use_fastmezo does not support FSDP2 (DTensor) parameters ({name!r}): the "
                             "trainers' forwards read FSDP's gathered copies, which passes on the shards would "
                             "not reach; train with fastmezo.patch + fastmezo.data_parallel or MeZOTrainer")
