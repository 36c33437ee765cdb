"""Validation rules, one place each: real numbers, coefficients that cannot overflow, tensors (dtype,
contiguity, device, no shared memory), noise keys and offsets, and the whole argument list of a pass.

Everything that writes weights checks with these before the first tensor changes: the plans of
fastmezo.plan (the functional API, the step engine, exact mode) and the Python kernels that fastmezo.ops
registers for the dispatcher. The native library checks the same rules itself, with the same words.
"""
from __future__ import annotations

import math
import numbers

import torch

from .noise import MASK32, key_from_name, parse_noise

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Largest |z| the contract can produce: Gaussian radius sqrt(-2 ln u) at the smallest uniform 2**-24,
#: with room for the approximate logarithm of compiled kernels (docs/noise.md); Rademacher gives 1.
Z_MAX = math.sqrt(-2.0 * math.log(2.0 ** -24)) * (1 + 1e-5)
_FLOAT32_MAX = torch.finfo(torch.float32).max


# -- numbers ----------------------------------------------------------------------------------------
def real(value, what: str) -> float:
    """``value`` as a float if it is a finite real number (a Python or numpy number, or a tensor of one
    element); TypeError for anything else (strings, bools, None), ValueError for inf and NaN."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{what} must be a real number, got a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


def positive(value, what: str) -> float:
    """A finite real number > 0 that is a normal float32 (the kernels compute in float32)."""
    try:
        v = real(value, what)
    except ValueError:
        v = math.nan
    if not torch.finfo(torch.float32).tiny <= v <= _FLOAT32_MAX:
        raise ValueError(f"{what} must be a finite number > 0, got {value} (at least "
                         f"{torch.finfo(torch.float32).tiny:.3g}, a normal float32: the kernels compute in float32)")
    return v


def nonnegative(value, what: str) -> float:
    v = real(value, what)
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return v


def per_tensor(value, n: int, what: str) -> list[float]:
    """One real number per tensor, from a number or a sequence of n numbers."""
    if not isinstance(value, (list, tuple)):
        return [real(value, what)] * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} values of {what} for {n} tensors")
    # Each distinct value checked once (keyed with its type, so that True is not taken for 1).
    checked = {}
    for v in value:
        k = (type(v), v)
        if k not in checked:
            checked[k] = real(v, what)
    return [checked[(type(v), v)] for v in value]


def coefficient(a: float, b: float, dtype: torch.dtype, what: str) -> None:
    """Refuse a pass x <- a * x + b * z that could turn a finite weight of ``dtype`` into inf or NaN:
    a and b must be float32 numbers (the kernels compute in float32) and |b| * max|z| at most half the
    dtype's largest value, so every weight within the other half stays finite when |a| <= 1."""
    limit = torch.finfo(dtype).max
    if not (abs(a) <= _FLOAT32_MAX and abs(b) <= _FLOAT32_MAX and abs(b) * Z_MAX <= limit / 2):
        raise OverflowError(f"{what}: the pass x <- {a!r} * x + {b!r} * z would overflow {dtype} weights "
                            f"(|b| must be at most {limit / 2 / Z_MAX:.4g}: max|z| = {Z_MAX:.3f}); nothing was changed")


# -- tensors ----------------------------------------------------------------------------------------
def split_named(tensors) -> tuple[list[torch.Tensor], list[str | None]]:
    """Accept a tensor, tensors, a dict or (name, tensor) pairs; return (tensors, names or None)."""
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


def label(i: int, name: str | None) -> str:
    return f"tensor {i} ({name!r})" if name else f"tensor {i}"


def check_tensors(tensors: list[torch.Tensor], labels: list[str], one_device: bool = True) -> None:
    """Dtypes, data, contiguity, devices, and no two tensors sharing memory: byte ranges by address, so
    two views of one storage and two storages over one buffer (two from_numpy views of an array) are
    both caught. ``labels`` name the tensors in messages. Raises before anything changes."""
    device = None
    spans: dict = {}
    for i, (t, what) in enumerate(zip(tensors, labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} is a {type(t).__name__}, not a torch.Tensor")
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
            raise ValueError(f"{what} is on {t.device} but {labels[0]} is on {device}; one call takes "
                             "tensors of one device (group them per device)")
        if t.numel():
            start = t.data_ptr()
            spans.setdefault(t.device, []).append((start, start + t.numel() * t.element_size(), what))
    for ranges in spans.values():
        ranges.sort()
        furthest = None
        for span in ranges:
            if furthest is not None and span[0] < furthest[1]:
                first, second = sorted((span[2], furthest[2]), key=labels.index)
                raise ValueError(f"{second} overlaps the memory of {first}; each tensor (e.g. a tied weight) "
                                 "must appear once or it is changed twice")
            if furthest is None or span[1] > furthest[1]:
                furthest = span


def check_call(tensors, outs, a, b, keys, offsets, noise, names=None) -> None:
    """Everything one pass relies on, for callers of the operators (the Python kernels registered in
    fastmezo.ops check with this; the native library has its own checks, with the same words): one
    a, b, key and offset per tensor, one output per tensor of the same shape and dtype, the tensors'
    own rules, keys and offsets in range, a known noise."""
    n = len(tensors)
    if not (len(a) == len(b) == len(keys) == len(offsets) == n):
        raise ValueError(f"got {n} tensors but {len(a)} a, {len(b)} b, {len(keys)} keys and {len(offsets)} offsets")
    labels = [label(i, None if names is None else names[i]) for i in range(n)]
    if outs is not None:
        if len(outs) != n:
            raise ValueError(f"got {n} tensors but {len(outs)} outs; expected one output per tensor")
        for i, (t, o) in enumerate(zip(tensors, outs)):
            if isinstance(o, torch.Tensor) and isinstance(t, torch.Tensor):
                if o.dtype != t.dtype:
                    raise ValueError(f"output {i} has dtype {o.dtype} but {labels[i]} has dtype {t.dtype}")
                if o.shape != t.shape:
                    raise ValueError(f"output {i} has shape {tuple(o.shape)} but {labels[i]} has shape "
                                     f"{tuple(t.shape)}")
        check_tensors(list(tensors) + list(outs), labels + [f"output {i}" for i in range(n)])
    else:
        check_tensors(list(tensors), labels)
    resolve_keys(list(keys), n, [None] * n)
    resolve_offsets(list(offsets), n)
    parse_noise(noise)


def resolve_keys(keys, n: int, names: list) -> list[int]:
    """Noise keys: "index" (tensor i gets key i; the default of the functional API, where tensors need
    no names), "name" (a CRC-32 of the canonical parameter name), or n distinct ints in [0, 2**32)."""
    if keys is None or (isinstance(keys, str) and keys == "index"):
        return list(range(n))
    if isinstance(keys, str):
        if keys != "name":
            raise ValueError(f"keys must be a sequence of ints, 'index' or 'name', got {keys!r}")
        missing = [i for i, name in enumerate(names) if name is None]
        if missing:
            raise ValueError(f"keys='name' needs (name, tensor) pairs; tensor {missing[0]} has no name")
        keys = [key_from_name(name) for name in names]
        if len(set(keys)) != n:
            raise ValueError("two parameter names hash to the same noise key; use keys='index'")
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


def resolve_offsets(offsets, n: int) -> list[int]:
    if offsets is None:
        return [0] * n
    offsets = list(offsets)
    if len(offsets) != n or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 or o >= 1 << 62
                                for o in offsets):
        raise ValueError(f"offsets must be {n} ints in [0, 2**62) (the global index of each tensor's "
                         "first element)")
    return offsets


