"""Functional API: the fused MeZO passes over lists of tensors. Other frontends call these.

Every function validates all of its arguments before it changes anything, so bad input raises a
clear error and leaves every tensor untouched. Tensors may be given as a list of tensors or as
(name, tensor) pairs (as ``model.named_parameters()`` yields). Tensor i gets noise key i unless
``keys`` is given; ``keys="name"`` derives keys from the names (fastmezo.noise.key_from_name).

The direction z of a tensor is a pure function of (seed, key, element index): see docs/noise.md.
"""
from __future__ import annotations

import math
import torch

from . import _ops
from .noise import MASK32, check_seed, key_from_name, parse_noise

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["perturb_", "restore_and_update_", "axpbz_", "perturbed", "make_noise", "noise_like",
           "SUPPORTED_DTYPES"]


def _split_named(tensors) -> tuple[list[torch.Tensor], list[str]]:
    """Accept a tensor, tensors, or (name, tensor) pairs; return (tensors, labels for messages)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if isinstance(tensors, dict):
        tensors = list(tensors.items())
    out, names = [], []
    for i, item in enumerate(tensors):
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            name, t = item
        else:
            name, t = None, item
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor "
                            "(give tensors or (name, tensor) pairs)")
        out.append(t)
        names.append(name)
    return out, names


def _label(i: int, name: str | None) -> str:
    return f"tensor {i} ({name!r})" if name else f"tensor {i}"


def _check_tensors(tensors: list[torch.Tensor], names: list[str | None], one_device: bool = True) -> None:
    device = None
    seen: dict = {}
    for i, (t, name) in enumerate(zip(tensors, names)):
        what = _label(i, name)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what} has dtype {t.dtype}; fastmezo perturbs floating-point tensors of "
                            "dtype float32, float16 or bfloat16")
        if t.is_meta:
            raise ValueError(f"{what} is a meta tensor (it has no data); materialize the model first")
        if not t.is_contiguous():
            raise ValueError(f"{what} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
                             "call .contiguous() on the parameter's data first")
        if device is None:
            device = t.device
        elif one_device and t.device != device:
            raise ValueError(f"{what} is on {t.device} but tensor 0 is on {device}; one call takes "
                             "tensors of one device (group them per device)")
        if t.numel():
            # Byte range within its storage: overlapping tensors (a tied weight given twice, or two
            # views of one buffer) would have the overlap perturbed twice.
            start = t.storage_offset() * t.element_size()
            span = (start, start + t.numel() * t.element_size(), i, name)
            seen.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(span)
    for spans in seen.values():
        spans.sort()
        for (_, end, i, name), (start, _, j, other) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"{_label(j, other)} overlaps the memory of {_label(i, name)}; each "
                                 "tensor (e.g. a tied weight) must appear once or it is perturbed twice")


def _resolve_keys(keys, n: int, names: list[str | None]) -> list[int]:
    if keys is None or (isinstance(keys, str) and keys == "index"):
        return list(range(n))
    if isinstance(keys, str):
        if keys != "name":
            raise ValueError(f"keys must be a sequence of ints, 'index' or 'name', got {keys!r}")
        missing = [i for i, name in enumerate(names) if name is None]
        if missing:
            raise ValueError(f"keys='name' needs (name, tensor) pairs; tensor {missing[0]} has no name")
        keys = [key_from_name(name) for name in names]
    keys = list(keys)
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for {n} tensors")
    for i, k in enumerate(keys):
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MASK32:
            raise ValueError(f"key {i} must be an int in [0, 2**32), got {k!r}")
    if len(set(keys)) != n:
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"tensor keys must be distinct (key {dup} repeats): two tensors with one key "
                         "would get the same noise")
    return keys


def _per_tensor(value, n: int, what: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"got {len(values)} values of {what} for {n} tensors")
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"{what} must be a number, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a number, got {type(v).__name__}") from None
        if not math.isfinite(v):
            raise ValueError(f"{what} must be finite, got {v}")
        out.append(v)
    return out


def _resolve_offsets(offsets, n: int) -> list[int]:
    if offsets is None:
        return [0] * n
    offsets = list(offsets)
    if len(offsets) != n or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 or o >= 1 << 62
                                for o in offsets):
        raise ValueError(f"offsets must be {n} ints in [0, 2**62) (the global index of each tensor's "
                         "first element)")
    return offsets


def axpbz_(tensors, a, b, seed: int, *, keys=None, noise="gaussian", offsets=None,
           rounding_seed: int | None = None, backend: str | None = None) -> None:
    """The general fused pass: tensor_i <- a_i * tensor_i + b_i * z_i, in place, one memory pass.

    a and b are numbers or one number per tensor; z_i = z(seed, key_i) over the global element
    indices offsets[i] + 0, 1, ... (offsets default to 0; a shard of a larger tensor passes the index
    of its first element so that it gets the same noise as the unsharded tensor).

    The result is computed in float32 and stored in each tensor's dtype, rounded to nearest; with a
    ``rounding_seed`` (uint64), float16 and bfloat16 results are rounded stochastically instead, with
    random bits from Philox stream 2 keyed by it (docs/noise.md section 8): the stored value is
    unbiased, so updates far below one ulp still move the weights on average.
    """
    tensors, names = _split_named(tensors)
    n = len(tensors)
    a = _per_tensor(a, n, "a")
    b = _per_tensor(b, n, "b")
    _launch(tensors, names, a, b, seed, keys, noise, offsets, backend, rounding_seed=rounding_seed)


def _launch(tensors, names, a, b, seed, keys, noise, offsets, backend, load_x=True, rounding_seed=None,
            outs=None) -> None:
    seed = check_seed(seed)
    if rounding_seed is not None:
        rounding_seed = check_seed(rounding_seed, "rounding_seed")
    kind = parse_noise(noise)
    if outs is None:
        _check_tensors(tensors, names)
    else:
        _check_outs(tensors, names, outs)   # checks the inputs too, together with the outputs
    keys = _resolve_keys(keys, len(tensors), names)
    offsets = _resolve_offsets(offsets, len(tensors))
    if backend is not None:
        from . import backends
        backends.requested_backend(backend)  # validates the name before anything runs
    _run(tensors, a, b, seed, keys, offsets, kind, backend, load_x, rounding_seed, outs)


def _check_outs(tensors, names, outs) -> None:
    """Outputs of an out-of-place pass: one per input, same shape, dtype and device, contiguous, and
    sharing no memory with any input or other output."""
    if len(outs) != len(tensors):
        raise ValueError(f"got {len(outs)} outputs for {len(tensors)} tensors")
    for i, (o, name) in enumerate(zip(outs, names)):
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"output for {_label(i, name)} is a {type(o).__name__}, not a torch.Tensor")
    # Inputs and outputs in one check: dtypes, contiguity, one device, no shared memory.
    _check_tensors(list(tensors) + list(outs), list(names) + [f"output {i}" for i in range(len(outs))],
                   one_device=True)
    for i, (t, o, name) in enumerate(zip(tensors, outs, names)):
        if o.shape != t.shape or o.dtype != t.dtype:
            raise ValueError(f"output for {_label(i, name)} has shape {tuple(o.shape)}, {o.dtype}; expected "
                             f"{tuple(t.shape)}, {t.dtype}")


def _run(tensors, a, b, seed, keys, offsets, kind, backend, load_x=True, rounding_seed=None, outs=None) -> None:
    """Run the fused pass over already validated arguments (tensors of one device).

    Lean on purpose: exact mode calls it once per hooked group of modules and forward (tens to
    hundreds of times a step)."""
    if all(t.numel() for t in tensors):
        live = None
    else:
        live = [i for i, t in enumerate(tensors) if t.numel()]
        if not live:
            return
        tensors, a, b, keys, offsets = ([v[i] for i in live] for v in (tensors, a, b, keys, offsets))
        if outs is not None:
            outs = [outs[i] for i in live]
    round_arg = None if rounding_seed is None else _ops.seed_arg(rounding_seed)
    grad = torch.is_grad_enabled()
    if grad:
        torch.set_grad_enabled(False)
    try:
        if outs is None:
            _ops.call_axpbz_(tensors, a, b, _ops.seed_arg(seed), keys, offsets, int(kind), load_x,
                             backend or "auto", round_arg)
        else:
            _ops.call_axpbz_out(tensors, outs, a, b, _ops.seed_arg(seed), keys, offsets, int(kind),
                                backend or "auto", round_arg)
    finally:
        if grad:
            torch.set_grad_enabled(True)


def perturb_(tensors, seed: int, alpha: float, *, keys=None, noise="gaussian", offsets=None,
             rounding_seed: int | None = None, backend: str | None = None) -> None:
    """Add alpha * z(seed) to each tensor in place (MeZO's +eps, -2 eps and restore passes).
    ``rounding_seed``: stochastic rounding of float16/bfloat16 results (see :func:`axpbz_`)."""
    tensors, names = _split_named(tensors)
    alpha = _per_tensor(alpha, len(tensors), "alpha")
    _launch(tensors, names, [1.0] * len(tensors), alpha, seed, keys, noise, offsets, backend,
            rounding_seed=rounding_seed)


def perturbed(tensors, seed: int, alpha: float, *, out=None, keys=None, noise="gaussian", offsets=None,
              rounding_seed: int | None = None, backend: str | None = None):
    """x + alpha * z(seed) for each tensor x, written to new tensors (or to ``out``); x is only read.

    The out-of-place pass of exact mode (fastmezo.patch(mode="exact")): the perturbed weight is
    materialized right before a module uses it and the stored weight never changes, in one read of x
    and one write of the result. Returns a tensor for a tensor argument, else a list.
    """
    single = isinstance(tensors, torch.Tensor)
    tensors, names = _split_named(tensors)
    n = len(tensors)
    alpha = _per_tensor(alpha, n, "alpha")
    if out is None:
        outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    else:
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
    _launch(tensors, names, [1.0] * n, alpha, seed, keys, noise, offsets, backend,
            rounding_seed=rounding_seed, outs=outs)
    return outs[0] if single else outs


def restore_and_update_(tensors, seed: int, eps: float, lr, projected_grad: float, *,
                        weight_decay=0.0, keys=None, noise="gaussian", offsets=None,
                        rounding_seed: int | None = None, backend: str | None = None) -> None:
    """Fused restore and ZO-SGD update, one pass, for tensors currently at theta - eps * z:

        theta <- (1 - lr * wd) * (theta + eps * z) - lr * projected_grad * z

    lr and weight_decay are numbers or one number per tensor (weight decay per tensor lets bias and
    norm parameters skip it). Computed as a * theta + b * z with a = 1 - lr * wd and
    b = a * eps - lr * projected_grad, in float64 on the host and float32 in the kernel.
    """
    tensors, names = _split_named(tensors)
    n = len(tensors)
    eps_v = _per_tensor(eps, n, "eps")
    if any(e <= 0 for e in eps_v):
        raise ValueError(f"eps must be > 0, got {min(eps_v)}")
    lr_v = _per_tensor(lr, n, "lr")
    wd_v = _per_tensor(weight_decay, n, "weight_decay")
    (g,) = _per_tensor(projected_grad, 1, "projected_grad")
    a = [1.0 - lr_i * wd_i for lr_i, wd_i in zip(lr_v, wd_v)]
    b = [a_i * e - lr_i * g for a_i, e, lr_i in zip(a, eps_v, lr_v)]
    _launch(tensors, names, a, b, seed, keys, noise, offsets, backend, rounding_seed=rounding_seed)


def make_noise(numel: int, seed: int, key: int = 0, *, noise="gaussian", offset: int = 0,
          device=None, dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """A new 1-D tensor holding z(seed, key) for elements offset .. offset + numel - 1.

    This materializes z (it is for tests, analysis and frontends that need z itself); the passes
    above never do.
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    out = torch.empty(numel, device=device, dtype=dtype)
    _launch([out], [None], [0.0], [1.0], seed, [key], noise,
            [offset] if offset else None, backend, load_x=False)
    return out


def noise_like(tensor: torch.Tensor, seed: int, key: int = 0, *, noise="gaussian", offset: int = 0,
               dtype=torch.float32, backend: str | None = None) -> torch.Tensor:
    """z(seed, key) shaped like ``tensor`` (float32 by default), on its device."""
    out = make_noise(tensor.numel(), seed, key, noise=noise, offset=offset,
                             device=tensor.device, dtype=dtype, backend=backend)
    return out.view(tensor.shape)
