"""Drop-in backend for MeZO frontends that follow the paper's trainer (Malladi et al., 2023).

Those trainers (the paper's ``trainer.py``, ZO-Bench and their forks) keep the parameters to train in
``self.named_parameters_to_optim`` as (name, parameter) pairs, the step's seed in
``self.zo_random_seed``, the projected gradient in ``self.projected_grad``, eps in ``self.args.zo_eps``,
and regenerate z with ``torch.manual_seed`` + ``torch.normal`` in two methods:

  zo_perturb_parameters(random_seed=None, scaling_factor=1):  theta += scaling_factor * eps * z
  zo_update(model):   theta -= lr * (projected_grad * z + wd * theta), wd skipped for names containing
                      "bias", "layer_norm" or "layernorm"; then lr_scheduler.step()

One call switches an existing trainer instance to fastmezo's fused in-place passes with the same
semantics, z now from fastmezo's noise contract (seed = the trainer's zo_random_seed, tensor key = the
parameter's position in named_parameters_to_optim):

    handle = fastmezo.integrations.use_fastmezo(trainer)
    ...                      # trainer.train() as before
    handle.remove()          # back to the trainer's own methods

Only the instance is changed. ``zo_update`` reads the learning rate from the trainer's
``_get_learning_rate()`` (as the paper's trainer does) or, failing that, ``args.learning_rate``.
"""
from __future__ import annotations

from .. import functional as F

_NO_DECAY = ("bias", "layer_norm", "layernorm")
_METHODS = ("zo_perturb_parameters", "zo_update")


def _seed(value) -> int:
    seed = int(value)
    if seed < 0:
        raise ValueError(f"zo_random_seed must be a non-negative int, got {value!r}")
    return seed


def _learning_rate(trainer) -> float:
    getter = getattr(trainer, "_get_learning_rate", None)
    return float(getter() if callable(getter) else trainer.args.learning_rate)


class FastMeZOFrontend:
    """Handle of a switched trainer; ``remove()`` restores the trainer's own methods."""

    def __init__(self, trainer, noise: str = "gaussian", backend: str | None = None):
        for name in _METHODS + ("args",):
            if not hasattr(trainer, name):
                raise TypeError(f"{type(trainer).__name__} has no {name!r}: it does not follow the MeZO "
                                "reference trainer's interface")
        if "_fastmezo_frontend" in vars(trainer):
            raise RuntimeError("this trainer already uses fastmezo; call remove() on its handle first")
        self.trainer, self.noise, self.backend = trainer, noise, backend
        self._saved = {name: vars(trainer)[name] for name in _METHODS if name in vars(trainer)}
        trainer.zo_perturb_parameters = self.zo_perturb_parameters
        trainer.zo_update = self.zo_update
        trainer._fastmezo_frontend = self

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        """theta += scaling_factor * zo_eps * z(seed), one fused in-place pass over all parameters."""
        t = self.trainer
        seed = _seed(t.zo_random_seed if random_seed is None else random_seed)
        F.perturb_(list(t.named_parameters_to_optim), seed, float(scaling_factor) * float(t.args.zo_eps),
                   noise=self.noise, backend=self.backend)

    def zo_update(self, model=None):
        """theta <- (1 - lr * wd) * theta - lr * projected_grad * z(zo_random_seed), wd skipped on bias and
        layer norm parameters by name; then the trainer's lr scheduler steps, as in the reference."""
        t = self.trainer
        params = list(t.named_parameters_to_optim)
        lr = _learning_rate(t)
        wd = float(getattr(t.args, "weight_decay", 0.0) or 0.0)
        g = float(t.projected_grad)
        a = [1.0 if any(s in name for s in _NO_DECAY) else 1.0 - lr * wd for name, _ in params]
        F.axpbz_(params, a, -lr * g, _seed(t.zo_random_seed), noise=self.noise, backend=self.backend)
        scheduler = getattr(t, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.step()

    def remove(self) -> None:
        """Give the trainer its own zo_perturb_parameters / zo_update back. Idempotent."""
        t = self.trainer
        if vars(t).get("_fastmezo_frontend") is not self:
            return
        for name in _METHODS:
            if name in self._saved:
                setattr(t, name, self._saved[name])
            else:
                delattr(t, name)
        del t._fastmezo_frontend


def use_fastmezo(trainer, *, noise: str = "gaussian", backend: str | None = None) -> FastMeZOFrontend:
    """Switch a reference-style MeZO trainer instance to fastmezo's fused kernels (see module doc)."""
    return FastMeZOFrontend(trainer, noise=noise, backend=backend)
