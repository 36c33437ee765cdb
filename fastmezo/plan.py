"""A validated plan of a parameter set: every check a pass needs, made once, and the passes themselves.

A :class:`Plan` holds tensors (with names for messages), their noise keys and offsets, and which backend
runs each device's tensors. Building it checks everything a pass relies on: dtypes, contiguity, one
memory range per tensor (two tensors sharing memory would be perturbed twice), keys, offsets, and that a
backend can run each device. :meth:`Plan.is_current` re-checks cheaply (same tensor objects, each with
the address, dtype, shape, strides and device it had: :func:`tensor_state`) so the optimizer rebuilds
only when the parameters changed. Before a pass, :meth:`Plan.check_coefficients` refuses coefficients
that could make a finite weight non-finite; :meth:`Plan.run` records the parts it finished and
:meth:`Plan.undo` moves them back after a failure.

The rules themselves live in fastmezo.checks; the functional API, the step engine, exact mode and the
integrations all build plans.
"""
from __future__ import annotations

from operator import attrgetter

import torch

from . import backends, ops
from .checks import check_tensors, coefficient, label, resolve_keys, resolve_offsets
from .noise import parse_noise

# What a pass relies on and an in-place change of a tensor's metadata can alter (``resize_``, ``set_``,
# ``as_strided_``, ``.data = ...``). Without the native library they are read by C-level getters: one
# map per property over all tensors is several times cheaper than a Python loop building tuples.
_STATE = (torch.Tensor.data_ptr, attrgetter("dtype"), attrgetter("shape"), torch.Tensor.stride,
          attrgetter("device"))


def _state_in_python(tensors) -> list:
    return [list(map(get, tensors)) for get in _STATE]


def _readers():
    """fastmezo._C's ``tensor_state`` and ``call_state`` when the native library loads, else the Python
    maps and no fast split."""
    from .backends import native

    module = native.load()
    if module is None:
        return _state_in_python, _no_call_state
    plain = tuple(ops.PLAIN_TYPES)
    return module.tensor_state, lambda items: module.call_state(items, plain)


def _no_call_state(items):
    return None


# The readers, chosen on first use and kept, so that states compare like with like (a fingerprint of
# call_state is only ever compared with another one).
_read_state = None
_read_call = None


def _choose_readers():
    global _read_state, _read_call
    state, call = _readers()
    _read_state = state if _read_state is None else _read_state
    _read_call = call if _read_call is None else _read_call


def tensor_state(tensors):
    """The state of plain tensors that a validated plan relies on: per tensor its data address, dtype,
    shape, strides and device. Two reads are equal exactly when every tensor kept all of them."""
    if _read_state is None:
        _choose_readers()
    return _read_state(tensors)


def call_state(items):
    """A functional call's ``tensors`` argument in one native pass, or None: for a list or tuple of
    plain tensors or of (str, plain tensor) tuples, (tensors, names or None, fingerprint, digest), where
    the fingerprint (bytes) holds every tensor's identity and :func:`tensor_state` and the names, so two
    equal fingerprints are the same call on unchanged tensors; ``digest`` is its hash. None for other
    arguments, or without the native library (the caller splits and checks in Python)."""
    if _read_call is None:
        _choose_readers()
    return _read_call(items)


class Plan:
    """A validated parameter set, ready for passes.

    ``Plan(tensors, names, keys=..., offsets=..., groups=..., noise=..., backend=...)``: ``groups[i]`` is
    the coefficient group of tensor i (the optimizer's param group; default 0 for all), so a pass takes
    one (a, b) per group. ``one_device``: refuse tensors of several devices (the functional API's rule);
    the optimizer's plans run each device's tensors in its own call. Empty tensors are kept (their
    keys stay theirs) but never sent to a backend.

    DTensor parameters (FSDP2's ``fully_shard``, ``distribute_tensor``): the plan holds each rank's
    local shard, with the offset the contract asks for, the global flat index of the shard's first
    element (:func:`local_shard`), so every rank draws the z of the unsharded tensor for its elements.
    """

    def __init__(self, tensors, names=None, *, keys=None, offsets=None, groups=None, noise="gaussian",
                 backend=None, one_device: bool = True):
        tensors = list(tensors)
        n = len(tensors)
        names = [None] * n if names is None else list(names)
        self._sharded = any(_is_dtensor(t) for t in tensors)
        tensors, offsets = _local_shards(tensors, names, offsets)
        check_tensors(tensors, [label(i, name) for i, name in enumerate(names)], one_device)
        self.tensors, self.names = tensors, names
        self.keys = resolve_keys(keys, n, names)
        self.offsets = resolve_offsets(offsets, n)
        self.groups = [0] * n if groups is None else list(groups)
        self.noise = int(parse_noise(noise))
        chosen = backends.requested(backend)
        by_device: dict = {}
        for i, t in enumerate(tensors):
            if t.numel():
                by_device.setdefault(t.device, []).append(i)
        # Every device's backend before any pass: a device no backend can run fails the plan, not a
        # step halfway through.
        self.devices = []       # (device, backend module, tensor indices, their keys, their offsets)
        for device, idx in by_device.items():
            self.devices.append((device, backends.select(device, chosen), idx, [self.keys[i] for i in idx],
                                 [self.offsets[i] for i in idx]))
        self._fingerprint = self._fingerprint_of(tensors)
        self._units = None
        self._launches: dict = {}           # device index -> prepared launches (see _prepared)
        self._group_dtypes = None           # the (coefficient group, dtype) pairs, for the checks

    @staticmethod
    def _fingerprint_of(tensors, sharded: bool = False):
        # A DTensor has no storage of its own: its local shard is what a pass writes.
        return tuple(map(id, tensors)), tensor_state(list(map(_local, tensors)) if sharded else tensors)

    def is_current(self, tensors) -> bool:
        """Whether ``tensors`` are still the plan's: the same objects, each with the data address, dtype,
        shape, strides and device it had (what a ``.to()``, ``.half()``, a replaced ``.data`` or an
        in-place resize changes)."""
        return len(tensors) == len(self.tensors) and self._fingerprint_of(tensors, self._sharded) == self._fingerprint

    def check_coefficients(self, a_of_group, b_of_group, what: str) -> None:
        """:func:`coefficient` for every (group, dtype) the plan has."""
        if self._group_dtypes is None:
            self._group_dtypes = {(self.groups[i], self.tensors[i].dtype) for _, _, idx, _, _ in self.devices
                                  for i in idx}
        for group, dtype in self._group_dtypes:
            coefficient(a_of_group[group], b_of_group[group], dtype, what)

    def units(self) -> list:
        """The parts a pass finishes one by one: (device, coefficient group) pairs, or for a backend that
        writes tensor by tensor (``PER_TENSOR``) (device, group, tensor index) triples."""
        if self._units is None:
            out = []
            for device, backend, idx, _, _ in self.devices:
                if getattr(backend, "PER_TENSOR", False):
                    out += [(device, self.groups[i], i) for i in idx]
                else:
                    out += [(device, g) for g in dict.fromkeys(self.groups[i] for i in idx)]
            self._units = out
        return list(self._units)

    def run(self, seed: int, a_of_group, b_of_group, *, round_seed=None, load_x: bool = True, outs=None,
            units=None, done=None) -> None:
        """One pass: tensor i <- a[g] * tensor i + b[g] * z(seed, key i), g its group (``outs``: written to
        outs[i] instead). Coefficients must have passed :meth:`check_coefficients`. Part by part
        (``units``: only these parts, see :meth:`units`); each finished part is appended to ``done``, so
        that after a failure the caller can undo exactly what ran."""
        for k, (device, backend, idx, _, _) in enumerate(self.devices):
            prepared = self._prepared(k) if outs is None else None
            if prepared is not None and not ops.tracing():
                for g, launch, written in prepared:
                    if units is None or (device, g) in units:
                        ops.launch(launch, self.tensors if written is None else [self.tensors[i] for i in written],
                                   a_of_group[g], b_of_group[g], seed, load_x, round_seed)
                        if done is not None:
                            done.append((device, g))
                continue
            per_tensor = getattr(backend, "PER_TENSOR", False)
            parts: dict = {}
            for i in idx:
                parts.setdefault((device, self.groups[i], i) if per_tensor else (device, self.groups[i]), []).append(i)
            for unit, members in parts.items():
                if units is not None and unit not in units:
                    continue
                g = self.groups[members[0]]
                ops.run(backend, [self.tensors[i] for i in members],
                        None if outs is None else [outs[i] for i in members], [a_of_group[g]] * len(members),
                        [b_of_group[g]] * len(members), seed, [self.keys[i] for i in members],
                        [self.offsets[i] for i in members], self.noise, load_x, round_seed)
                if done is not None:
                    done.append(unit)

    def undo(self, seed: int, a_of_group, b_of_group, done, round_seed=None) -> None:
        """Move the parts in ``done`` back from a pass x <- a x + b z by the inverse pass x <- (x - b z) / a
        (exact up to the rounding of the two passes). A part scaled by a = 0 (lr * weight_decay = 1) was
        zeroed and cannot be brought back: it is left as it is."""
        if done:
            self.run(seed, [1.0 / a if a else 1.0 for a in a_of_group],
                     [-b / a if a else 0.0 for a, b in zip(a_of_group, b_of_group)], round_seed=round_seed,
                     units=set(done))

    def _prepared(self, k: int):
        """Device k's prepared in-place launches, one per coefficient group, as (group, launch, indices of
        the tensors it writes, None for all of them in order) (built on first use; a launch holds no
        tensor); None where its backend prepares nothing or a tensor is a subclass that must see each
        call."""
        if k in self._launches:
            return self._launches[k]
        _, backend, idx, keys, offsets = self.devices[k]
        prepared = None
        if getattr(backend, "prepare", None) is not None and ops.plain([self.tensors[i] for i in idx]):
            by_group: dict = {}
            for j, i in enumerate(idx):
                by_group.setdefault(self.groups[i], []).append(j)
            prepared = []
            for g, js in by_group.items():
                tensors = [self.tensors[idx[j]] for j in js]
                written = [idx[j] for j in js]
                prepared.append((g, backend.prepare(tensors, [keys[j] for j in js], [offsets[j] for j in js],
                                                    self.noise),
                                 None if written == list(range(len(self.tensors))) else written))
        self._launches[k] = prepared
        return prepared

    def backend_of(self, device):
        for d, backend, *_ in self.devices:
            if d == device:
                return backend
        return backends.select(device)


def _is_dtensor(t) -> bool:
    # Imported lazily: torch.distributed is not built on every platform, and plain plans never need it.
    if not hasattr(t, "placements"):
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local(t):
    if _is_dtensor(t):
        with torch.no_grad():       # under no_grad to_local() is the shard itself, not an autograd view
            return t.to_local()
    return t


def local_shard(t, what: str):
    """(local shard, offset) of a DTensor: the shard this rank holds and the global flat (row-major)
    index of its first element. The contract indexes z by that global index (docs/noise.md section 2),
    so the shard's element j must be element offset + j of the full tensor: the shard has to be one
    contiguous range of the flattened tensor (Shard(0) and Replicate placements are; Shard(d > 0) of a
    tensor with more than one row is not, and is refused)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if type(p) not in (Shard, Replicate):
            raise ValueError(f"{what} is a DTensor with placement {p}; fastmezo perturbs DTensors sharded with "
                             "Shard or Replicate placements (a Partial tensor's shard is not its value)")
    local = _local(t)
    shape, start = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(local.shape):
        raise ValueError(f"{what}: the local shard has shape {tuple(local.shape)} but its placements give "
                         f"{tuple(shape)}; fastmezo cannot tell which global elements it holds")
    if local.numel() == 0:
        return local, 0
    split = [d for d in range(len(shape)) if shape[d] != t.shape[d]]
    if split and any(shape[d] != 1 for d in range(split[-1])):
        raise ValueError(f"{what} is sharded as {t.placements} (local shape {tuple(shape)} of {tuple(t.shape)}): "
                         "its shard is not one contiguous range of the flattened tensor, so z could not follow "
                         "the global element index; shard parameters along dimension 0 (FSDP2 does)")
    offset, stride = 0, 1
    for d in reversed(range(len(shape))):
        offset += start[d] * stride
        stride *= t.shape[d]
    return local, offset


def _local_shards(tensors, names, offsets):
    """DTensors replaced by their local shards, with the shards' offsets. Offsets given by the caller
    for a DTensor are refused: its placements define them."""
    if not any(_is_dtensor(t) for t in tensors):
        return tensors, offsets
    if offsets is not None:
        raise ValueError("offsets cannot be given for DTensor parameters: each shard's offset comes from "
                         "its placements")
    locals_, offsets = [], []
    for i, t in enumerate(tensors):
        if _is_dtensor(t):
            t, offset = local_shard(t, label(i, names[i]))
        else:
            offset = 0
        locals_.append(t)
        offsets.append(offset)
    return locals_, offsets
