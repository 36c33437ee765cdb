"""The benchmark baseline: perturbing and updating parameters the way the MeZO paper's trainer does
(Malladi et al., 2023, ``zo_perturb_parameters`` and ``zo_update``). Every benchmark measures fastmezo
against it; its rows are labelled ``reference`` in the results (not to be confused with
``fastmezo.oracle``, the noise oracle the tests compare the kernels with).

It keeps the paper's costs on purpose:
z is regenerated with torch's own generator, ``torch.manual_seed(seed)`` then one
``torch.normal`` per parameter in parameter order, and applied out of place
(``p.data = p.data + ...``), which allocates temporaries the size of each parameter.

Seeding: as in the paper's trainer, the generator is seeded once at the start of each pass and z of
each parameter is the next draw from it (seeding again before every parameter would give every
parameter of one shape the same z, and would add one ``manual_seed`` call per tensor to the cost).

A MeZO step in this style is four passes over the parameters::

    baseline_perturb(params, s, +1, eps)   # theta + eps z       -> loss_plus
    baseline_perturb(params, s, -2, eps)   # theta - eps z       -> loss_minus
    baseline_perturb(params, s, +1, eps)   # theta (restored)
    baseline_update(params, s, lr, g, wd, names)
"""
from __future__ import annotations

import torch

#: Parameters whose name contains one of these get no weight decay (as in the paper's trainer).
NO_DECAY = ("bias", "layer_norm", "layernorm")


def _normal_like(p: torch.Tensor) -> torch.Tensor:
    """The next z for parameter p from torch's global generator (of p's device), in p's dtype."""
    return torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)


@torch.no_grad()
def baseline_perturb(params, seed: int, scaling_factor: float, eps: float) -> None:
    """theta <- theta + scaling_factor * eps * z(seed) for every tensor in ``params``, out of place.

    params: tensors or nn.Parameters (each gets a new ``.data``). z is drawn in the parameter's dtype.
    """
    torch.manual_seed(seed)
    for p in params:
        z = _normal_like(p)
        p.data = p.data + scaling_factor * z * eps


@torch.no_grad()
def baseline_update(params, seed: int, lr: float, projected_grad: float, weight_decay: float,
                     names=None) -> None:
    """ZO-SGD update theta <- theta - lr * (projected_grad * z(seed) + wd * theta), out of place.

    z is regenerated exactly as ``baseline_perturb`` drew it. Weight decay is skipped for parameters
    whose name (``names[i]``, parallel to ``params``) contains "bias", "layer_norm" or "layernorm";
    without names every parameter gets weight decay.
    """
    params = list(params)
    if names is None:
        names = [""] * len(params)
    names = list(names)
    if len(names) != len(params):
        raise ValueError(f"got {len(names)} names for {len(params)} parameters")
    torch.manual_seed(seed)
    for name, p in zip(names, params):
        z = _normal_like(p)
        if any(tag in name for tag in NO_DECAY):
            p.data = p.data - lr * (projected_grad * z)
        else:
            p.data = p.data - lr * (projected_grad * z + weight_decay * p.data)


@torch.no_grad()
def baseline_step(params, names, closure, seed: int, eps: float, lr: float, weight_decay: float = 0.0):
    """One whole MeZO step the baseline way, as the paper's trainer runs it (``zo_step`` then
    ``zo_update``): four passes over the parameters around two forward passes.

    ``closure()`` returns the loss (a scalar tensor or a number) at the current weights. The projected
    gradient is ``(loss_plus - loss_minus) / (2 eps)`` as a Python float: one device synchronisation per
    step, as in the paper's ``.item()``. Returns ``(loss_plus, projected_grad)``.

    Nothing is undone if the closure raises (the paper's trainer does not either): the weights are
    then left perturbed.
    """
    params = list(params)
    baseline_perturb(params, seed, 1, eps)
    loss_plus = closure()
    baseline_perturb(params, seed, -2, eps)
    loss_minus = closure()
    projected_grad = float((loss_plus - loss_minus) / (2 * eps))
    baseline_perturb(params, seed, 1, eps)
    baseline_update(params, seed, lr, projected_grad, weight_decay, names)
    return loss_plus, projected_grad
