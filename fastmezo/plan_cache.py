"""Validated plans of recent functional calls, held so that they never keep the caller's tensors alive.

A frontend calls the functional API with the same tensors every step; validating them all each call
(dtypes, contiguity, no shared memory, keys, backends) costs more host time than the pass itself on a
mid-sized model. This cache keeps the :class:`fastmezo.plan.Plan` of recent calls, keyed by the call
(the tensors' identities, names, keys, offsets, coefficient groups, noise, backend request), and
reuses it only while the call's tensors are provably the ones it validated:

* the cache holds weak references only; when any tensor of an entry dies, a weakref callback drops
  the entry, so an entry that is found refers to live objects, and the ``id`` s in its key are theirs;
* every tensor still has the data address, dtype, shape, stride and device it had when validated
  (:func:`fastmezo.plan.tensor_state`: what ``resize_``, ``set_``, ``as_strided_``, ``.data = ...`` or
  ``.to()`` change); any difference and the call is validated from scratch, with the usual errors.
  With the native library the call's fingerprint (:func:`fastmezo.plan.call_state`: the tensors'
  identities, their state and the names, read in one pass) is the key itself, so a found entry is
  already a checked one.

Between calls the plan holds no tensor: :func:`lease` attaches the caller's tensors for one call and
:func:`give_back` detaches them again (the launches the plan prepared hold no tensor, so they stay).
Tensor subclasses (DTensor, fakes under tracing) are never cached: their storage is not theirs to
fingerprint. Each lease takes its entry out of the cache, so two threads never share a plan.
"""
from __future__ import annotations

import os
import threading
import weakref

from . import backends
from .ops import PLAIN_TYPES
from .plan import Plan, tensor_state

_CAPACITY = 8
_entries: dict = {}          # in insertion order: the oldest entry first
_lock = threading.Lock()


class _Key:
    """A call's key with its hash computed once: a lookup and the re-insertion after the call would
    otherwise hash the tensors' identities (hundreds of them) again each time. ``digest``: the hash of
    parts[0] when it is already known (a fingerprint's, computed natively)."""
    __slots__ = ("parts", "hash")

    def __init__(self, parts, digest=None):
        self.parts = parts
        self.hash = hash(parts) if digest is None else hash((digest, parts[1:]))

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        return isinstance(other, _Key) and self.hash == other.hash and self.parts == other.parts


class _Entry:
    __slots__ = ("plan", "state", "refs", "dead")

    def __init__(self, plan, state, refs, dead):
        self.plan, self.state, self.refs, self.dead = plan, state, refs, dead


def _key(tensors, names, keys, offsets, groups, noise, backend, plain, fingerprint=None):
    """The call's key, or None when part of it cannot be a dict key (validated by Plan as usual)."""
    rest = (keys if isinstance(keys, (str, type(None))) else tuple(keys),
            None if offsets is None else tuple(offsets), tuple(groups), noise, backend,
            os.environ.get(backends.ENV_VAR))
    try:
        if fingerprint is not None:
            return _Key((fingerprint[0],) + rest, fingerprint[1])
        if not plain and set(map(type, tensors)) - PLAIN_TYPES:
            return None
        unnamed = names.count(None) == len(names)
        return _Key((tuple(map(id, tensors)), None if unnamed else tuple(names)) + rest)
    except TypeError:
        return None


def lease(tensors, names, *, keys, offsets, groups, noise, backend, plain=False, fingerprint=None):
    """(plan, key) for one in-place call on one device: a cached plan attached to ``tensors`` when the
    call and the tensors are unchanged, else a new validated Plan (which raises on bad input). Hand it
    back with :func:`give_back` when the call is over. ``plain``: the caller checked that every tensor
    is a plain tensor or parameter. ``fingerprint``: (bytes, digest) of fastmezo.plan.call_state for
    these tensors and names, which then stands for their identities and state."""
    key = _key(tensors, names, keys, offsets, groups, noise, backend, plain, fingerprint)
    entry = None
    if key is not None:
        with _lock:
            entry = _entries.pop(key, None)
    checked = fingerprint is not None                 # the key itself holds the tensors' state
    if entry is not None and not entry.dead[0] and (checked or tensor_state(tensors) == entry.state):
        entry.plan.tensors = tensors
        return entry.plan, (key, entry)
    plan = Plan(tensors, names, keys=keys, offsets=offsets, groups=list(groups), noise=noise, backend=backend,
                one_device=True)
    if key is None:
        return plan, None
    dead = [False]

    def forget(_ref, key=key, dead=dead, entries=_entries):
        # No lock: a callback can run inside any allocation (a garbage collection), even one made while
        # this thread holds the lock; single dict operations are atomic. ``entries`` is bound here
        # because callbacks also run at interpreter exit, after module globals are cleared.
        dead[0] = True
        held = entries.get(key)
        if held is not None and held.dead is dead:
            entries.pop(key, None)

    state = None if checked else tensor_state(tensors)
    return plan, (key, _Entry(plan, state, [weakref.ref(t, forget) for t in tensors], dead))


def give_back(plan, ticket) -> None:
    """Detach the plan from the call's tensors and keep it for the next call with them."""
    if ticket is None:
        return
    key, entry = ticket
    plan.tensors = ()
    if entry.dead[0]:
        return
    with _lock:
        _entries[key] = entry
        while len(_entries) > _CAPACITY:
            del _entries[next(iter(_entries))]


def clear() -> None:
    """Forget every cached plan."""
    with _lock:
        _entries.clear()
