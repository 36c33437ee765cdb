"""Functional API: the fused MeZO passes over lists of tensors. Other frontends call these.

Every function validates all of its arguments before it changes anything (fastmezo.plan), so bad input
raises a clear error and leaves every tensor untouched (an in-place call with the tensors of a recent
call, unchanged, reuses that call's validated plan: fastmezo.plan_cache, which holds no tensor);
coefficients that could turn a finite weight into inf are refused the same way (OverflowError). If a
backend fails partway through a pass, the tensors it had already written are moved back by the inverse
pass before the error propagates. Tensors may be given as a list of tensors or as (name, tensor) pairs
(as ``model.named_parameters()`` yields). Tensor i gets noise key i unless ``keys`` is given;
``keys="name"`` derives keys from the names (fastmezo.noise.key_from_name).

The direction z of a tensor is a pure function of (seed, key, element index): see docs/noise.md.
"""
from __future__ import annotations

import torch

from .engine import check_decay, update_coefficients
from .noise import check_seed
from .checks import SUPPORTED_DTYPES, check_call, nonnegative, per_tensor, positive, real, split_named
from . import plan_cache
from .ops import PLAIN_TYPES
from .plan import Plan, call_state

__all__ = ["perturb_", "restore_and_update_", "update_", "scale_and_add_noise_", "perturbed", "make_noise",
           "noise_like", "SUPPORTED_DTYPES"]


def _split(tensors):
    """(tensors, names, whether all are known plain tensors, fingerprint or None): split_named, with fast
    paths for the common cases, a list of plain tensors or of (name, plain tensor) tuples (a frontend's
    named_parameters): one native pass that also fingerprints the call for the plan cache
    (fastmezo.plan.call_state), or without it C-level maps instead of a loop."""
    fast = call_state(tensors)
    if fast is not None:
        found, names, fingerprint, digest = fast
        return found, [None] * len(found) if names is None else names, True, (fingerprint, digest)
    if type(tensors) in (list, tuple) and tensors:
        kinds = set(map(type, tensors))
        if kinds <= PLAIN_TYPES:
            return list(tensors), [None] * len(tensors), True, None
        if kinds == {tuple}:
            try:
                columns = tuple(zip(*tensors, strict=True))      # strict: every tuple of one length
            except ValueError:
                columns = ()
            if (len(columns) == 2 and set(map(type, columns[0])) == {str}
                    and set(map(type, columns[1])) <= PLAIN_TYPES):
                return list(columns[1]), list(columns[0]), True, None
    return (*split_named(tensors), False, None)


def _pass(tensors, a, b, seed, *, keys, noise, offsets, backend, rounding_seed=None, outs=None, load_x=True,
          what="the pass"):
    """Validate everything, then one pass: tensor_i (or outs[i]) <- a_i * tensor_i + b_i * z_i."""
    tensors, names, plain, fingerprint = tensors
    seed = check_seed(seed)
    if rounding_seed is not None:
        rounding_seed = check_seed(rounding_seed, "rounding_seed")
    if outs is not None:
        check_call(tensors, outs, a, b, range(len(tensors)), [0] * len(tensors), noise, names)
    # One coefficient group per distinct (a, b): the checks and the backends' launches go by group.
    if not a or (a.count(a[0]) == len(a) and b.count(b[0]) == len(b)):
        groups, a_of_group, b_of_group = (0,) * len(a), a[:1], b[:1]
    else:
        pairs: dict = {}
        groups = tuple(pairs.setdefault(pair, len(pairs)) for pair in zip(a, b))
        a_of_group, b_of_group = [p[0] for p in pairs], [p[1] for p in pairs]
    if outs is None and load_x:
        # In-place passes over the caller's tensors: the same tensors come back every step (plan_cache).
        plan, ticket = plan_cache.lease(tensors, names, keys=keys, offsets=offsets, groups=groups, noise=noise,
                                        backend=backend, plain=plain, fingerprint=fingerprint)
    else:
        plan, ticket = Plan(tensors, names, keys=keys, offsets=offsets, groups=list(groups), noise=noise,
                            backend=backend, one_device=True), None
    try:
        plan.check_coefficients(a_of_group, b_of_group, what)
        done = []
        try:
            plan.run(seed, a_of_group, b_of_group, round_seed=rounding_seed, load_x=load_x, outs=outs, done=done)
        except BaseException:
            if outs is None and load_x:            # the parts already written go back
                plan.undo(seed, a_of_group, b_of_group, done, rounding_seed)
            raise
    finally:
        plan_cache.give_back(plan, ticket)


def scale_and_add_noise_(tensors, a, b, seed: int, *, keys=None, noise="gaussian", offsets=None,
                         rounding_seed: int | None = None, backend: str | None = None) -> None:
    """The general fused pass: tensor_i <- a_i * tensor_i + b_i * z_i, in place, one memory pass.

    a and b are numbers or one number per tensor; z_i = z(seed, key_i) over the global element
    indices offsets[i] + 0, 1, ... (offsets default to 0; a shard of a larger tensor passes the index
    of its first element so that it gets the same noise as the unsharded tensor).

    The result is computed in float32 and stored in each tensor's dtype, rounded to nearest even;
    with a ``rounding_seed`` (uint64), float16 and bfloat16 results are rounded stochastically instead,
    with random bits from Philox stream 2 keyed by it (docs/noise.md section 8): the stored value is
    unbiased, so updates far below one ulp still move the weights on average.
    """
    tensors = _split(tensors)
    n = len(tensors[0])
    _pass(tensors, per_tensor(a, n, "a"), per_tensor(b, n, "b"), seed, keys=keys, noise=noise, offsets=offsets,
          backend=backend, rounding_seed=rounding_seed)


def perturb_(tensors, seed: int, alpha: float, *, keys=None, noise="gaussian", offsets=None,
             rounding_seed: int | None = None, backend: str | None = None) -> None:
    """Add alpha * z(seed) to each tensor in place (MeZO's +eps, -2 eps and restore passes).
    ``rounding_seed``: stochastic rounding of float16/bfloat16 results (see :func:`scale_and_add_noise_`)."""
    tensors = _split(tensors)
    n = len(tensors[0])
    _pass(tensors, [1.0] * n, per_tensor(alpha, n, "alpha"), seed, keys=keys, noise=noise, offsets=offsets,
          backend=backend, rounding_seed=rounding_seed, what="perturb_")


def perturbed(tensors, seed: int, alpha: float, *, out=None, keys=None, noise="gaussian", offsets=None,
              rounding_seed: int | None = None, backend: str | None = None):
    """x + alpha * z(seed) for each tensor x, written to new tensors (or to ``out``); x is only read.

    The out-of-place pass of exact mode (fastmezo.patch(mode="exact")): the perturbed weight is
    materialized right before a module uses it and the stored weight never changes, in one read of x
    and one write of the result. Returns a tensor for a tensor argument, else a list.
    """
    single = isinstance(tensors, torch.Tensor)
    tensors = _split(tensors)
    n = len(tensors[0])
    alpha = per_tensor(alpha, n, "alpha")
    if out is None:
        outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors[0]]
    else:
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
    _pass(tensors, [1.0] * n, alpha, seed, keys=keys, noise=noise, offsets=offsets, backend=backend,
          rounding_seed=rounding_seed, outs=outs, what="perturbed")
    return outs[0] if single else outs


def _update(tensors, seed, lr, projected_grad, weight_decay, eps, keys, noise, offsets, rounding_seed, backend,
            what):
    tensors = _split(tensors)
    n = len(tensors[0])
    g = real(projected_grad, "projected_grad")
    # Numbers (not lists) for all three: one set of hyperparameters, expanded to every tensor at the end.
    m = n if any(isinstance(v, (list, tuple)) for v in (lr, weight_decay, eps)) else 1
    hypers = list(zip(per_tensor(lr, m, "lr"), per_tensor(weight_decay, m, "weight_decay"),
                      [None] * m if eps is None else per_tensor(eps, m, "eps")))
    # Coefficients per distinct (lr, wd, eps): a per-tensor list usually holds two or three.
    coefficients = {}
    for hyper in hypers:
        if hyper not in coefficients:
            lr_i, wd_i = nonnegative(hyper[0], "lr"), nonnegative(hyper[1], "weight_decay")
            check_decay(lr_i, wd_i, what)
            eps_i = None if hyper[2] is None else positive(hyper[2], "eps")
            coefficients[hyper] = update_coefficients(lr_i, wd_i, g, eps_i)
    a, b = [coefficients[h][0] for h in hypers], [coefficients[h][1] for h in hypers]
    reps = n if m == 1 else 1
    _pass(tensors, a * reps, b * reps, seed, keys=keys, noise=noise, offsets=offsets, backend=backend,
          rounding_seed=rounding_seed, what=what)


def restore_and_update_(tensors, seed: int, eps: float, lr, projected_grad: float, *,
                        weight_decay=0.0, keys=None, noise="gaussian", offsets=None,
                        rounding_seed: int | None = None, backend: str | None = None) -> None:
    """Fused restore and ZO-SGD update, one pass, for tensors currently at theta - eps * z:

        theta <- (1 - lr * wd) * (theta + eps * z) - lr * projected_grad * z

    lr and weight_decay are numbers >= 0 or one per tensor (weight decay per tensor lets bias and norm
    parameters skip it). Computed as a * theta + b * z with a = 1 - lr * wd and
    b = a * eps - lr * projected_grad, in float64 on the host and float32 in the kernel.
    """
    _update(tensors, seed, lr, projected_grad, weight_decay, eps, keys, noise, offsets, rounding_seed, backend,
            "restore_and_update_")


def update_(tensors, seed: int, lr, projected_grad: float, *, weight_decay=0.0, keys=None, noise="gaussian",
            offsets=None, rounding_seed: int | None = None, backend: str | None = None) -> None:
    """The ZO-SGD update, one pass, for tensors at theta (never perturbed, as in exact mode or after a
    restore):

        theta <- (1 - lr * wd) * theta - lr * projected_grad * z(seed)

    (:func:`restore_and_update_` is the version for tensors at theta - eps z.)
    """
    _update(tensors, seed, lr, projected_grad, weight_decay, None, keys, noise, offsets, rounding_seed, backend,
            "update_")


def make_noise(numel: int, seed: int, key: int = 0, *, noise="gaussian", offset: int = 0,
               device=None, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """A new 1-D tensor holding z(seed, key) for elements offset .. offset + numel - 1.

    This materializes z (it is for tests, analysis and frontends that need z itself); the passes
    above never do.
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    out = torch.empty(numel, device=device, dtype=dtype)
    _pass(([out], [None], False, None), [0.0], [1.0], seed, keys=[key], noise=noise,
          offsets=[offset] if offset else None, backend=backend, load_x=False, what="make_noise")
    return out


def noise_like(tensor: torch.Tensor, seed: int, key: int = 0, *, noise="gaussian", offset: int = 0,
               dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """z(seed, key) shaped like ``tensor`` (float32 by default), on its device."""
    out = make_noise(tensor.numel(), seed, key, noise=noise, offset=offset, device=tensor.device, dtype=dtype,
                     backend=backend)
    return out.view(tensor.shape)
