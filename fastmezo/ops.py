"""The op contract: one fused pass, two torch.library operators, implementations registered per device.

    fastmezo::scale_add_noise_(tensors!, a, b, seed, keys, offsets, noise, load_x, round_seed)
        tensors[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i])     (load_x=False: b[i] * z)
    fastmezo::scale_add_noise_out(tensors, outs!, a, b, seed, keys, offsets, noise, round_seed)
        outs[i] <- a[i] * tensors[i] + b[i] * z(seed, keys[i])        (tensors only read)

z over the global element indices offsets[i] + 0, 1, ... (docs/noise.md); float16/bfloat16 results
rounded stochastically with the bits of ``round_seed`` when it is given, else to nearest even.
Seeds are uint64 in the contract; the schema's ``int`` is int64, so the dispatcher carries the
two's-complement value and the registered kernels take the bits back.

Who runs the op: the torch oracle (fastmezo.backends.oracle) is the default implementation for every
device; on first use of a device the chosen backend (fastmezo.backends.select: FASTMEZO_BACKEND or the
automatic order) registers its kernel for that device type: Triton for CUDA, the native C++ library
for CPU (and CUDA where Triton is missing), straight into this namespace.

Eager calls on plain tensors skip the dispatcher (:func:`run`): the dispatcher's handling of a list of
hundreds of tensors costs host time comparable to a whole pass on a mid-sized model. Under
torch.compile, a dispatch mode (FakeTensorMode) or with tensor subclasses the call goes through the
operators, which is what those need.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .noise import MASK64
from .checks import check_call

_lib = torch.library.Library("fastmezo", "DEF")
_lib.define("scale_add_noise_(Tensor(a!)[] tensors, float[] a, float[] b, int seed, int[] keys, int[] offsets, "
            "int noise, bool load_x=True, int? round_seed=None) -> ()")
_lib.define("scale_add_noise_out(Tensor[] tensors, Tensor(a!)[] outs, float[] a, float[] b, int seed, int[] keys, "
            "int[] offsets, int noise, int? round_seed=None) -> ()")

IN_PLACE = "fastmezo::scale_add_noise_"
OUT_OF_PLACE = "fastmezo::scale_add_noise_out"


def _bits(value: Optional[int]) -> Optional[int]:
    return None if value is None else value & MASK64


def _schema_int(value: Optional[int]) -> Optional[int]:
    """uint64 -> the int64 with the same bits (what the schema carries)."""
    if value is None:
        return None
    return value - (1 << 64) if value >= (1 << 63) else value


@torch.library.register_fake(IN_PLACE)
def _fake_in_place(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None):
    return None


@torch.library.register_fake(OUT_OF_PLACE)
def _fake_out(tensors, outs, a, b, seed, keys, offsets, noise, round_seed=None):
    return None


def _python_kernels(backend):
    """The (in place, out of place) kernels of a Python backend, in the schema's argument order; they
    check their arguments as the native library does, and skip empty tensors."""
    def in_place(tensors, a, b, seed, keys, offsets, noise, load_x=True, round_seed=None):
        check_call(tensors, None, a, b, keys, offsets, noise)
        live = [i for i, t in enumerate(tensors) if t.numel()]
        if live:
            t, _, a, b, keys, offsets = _take(live, tensors, None, a, b, keys, offsets)
            backend.run(t, None, a, b, seed & MASK64, keys, offsets, noise, load_x, _bits(round_seed))

    def out_of_place(tensors, outs, a, b, seed, keys, offsets, noise, round_seed=None):
        check_call(tensors, outs, a, b, keys, offsets, noise)
        live = [i for i, t in enumerate(tensors) if t.numel()]
        if live:
            t, o, a, b, keys, offsets = _take(live, tensors, outs, a, b, keys, offsets)
            backend.run(t, o, a, b, seed & MASK64, keys, offsets, noise, True, _bits(round_seed))
    return in_place, out_of_place


def _take(live, tensors, outs, a, b, keys, offsets):
    pick = lambda v: None if v is None else [v[i] for i in live]  # noqa: E731
    return pick(tensors), pick(outs), pick(a), pick(b), pick(keys), pick(offsets)


_oracle_in_place, _oracle_out = _python_kernels(backends.oracle)
torch.library.impl(_lib, "scale_add_noise_", "CompositeExplicitAutograd")(_oracle_in_place)
torch.library.impl(_lib, "scale_add_noise_out", "CompositeExplicitAutograd")(_oracle_out)


_installed: dict = {}     # device type -> the backend whose kernels the dispatcher runs for it


def install(device: torch.device):
    """Register the chosen backend's kernels for ``device``'s type (once per process and type) and
    return that backend. The oracle needs no registration: it is the default."""
    kind = device.type
    backend = _installed.get(kind)
    if backend is None:
        backend = backends.select(device)
        if backend is backends.native:
            backend.register_kernels(kind)
        elif backend is not backends.oracle:
            in_place, out_of_place = _python_kernels(backend)
            torch.library.register_kernel(IN_PLACE, kind, in_place, lib=_lib)
            torch.library.register_kernel(OUT_OF_PLACE, kind, out_of_place, lib=_lib)
        _installed[kind] = backend
    return backend


#: Tensor types that need no dispatch of their own (no subclass that must see the call).
PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def tracing() -> bool:
    """Whether something may be tracing the calls now (torch.compile, a dispatch mode)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def plain(tensors) -> bool:
    """Whether every tensor is a plain tensor or parameter (no subclass that must see the call)."""
    return all(type(t) in PLAIN_TYPES for t in tensors)


def _plain(tensors) -> bool:
    """True when a call may skip the dispatcher: eager, nothing tracing, plain tensors."""
    return not tracing() and plain(tensors)


_bump = None        # the version-counter bump, chosen on first use


def bump_versions(tensors) -> None:
    """torch.autograd.graph.increment_version(tensors), by fastmezo._C's ``bump_versions`` when the
    native library loads (it reads the list in place, which matters at hundreds of tensors a pass)."""
    global _bump
    if _bump is None:
        from .backends import native

        module = native.load()
        _bump = module.bump_versions if module is not None else torch.autograd.graph.increment_version
    _bump(tensors)


def launch(prepared, written, a: float, b: float, seed: int, load_x: bool = True,
           round_seed: Optional[int] = None) -> None:
    """An in-place pass through a prepared launch (a backend's ``prepare``) that writes ``written``.
    Only for eager calls on plain tensors (the caller checks :func:`tracing` and :func:`plain`); autograd
    and version counters as in :func:`run`."""
    grad = torch.is_grad_enabled()
    if grad:
        torch.set_grad_enabled(False)
    try:
        prepared(a, b, seed, round_seed, load_x)
        bump_versions(written)
    finally:
        if grad:
            torch.set_grad_enabled(True)


def run(backend, tensors, outs, a, b, seed: int, keys, offsets, noise: int, load_x: bool = True,
        round_seed: Optional[int] = None) -> None:
    """One fused pass over validated, non-empty tensors of one device (``outs`` None: in place).

    ``backend`` is the module chosen for the device (fastmezo.backends.select). Eager calls on plain
    tensors call it directly; anything else goes through the operators (where the device's installed
    backend runs). Autograd is off during the pass (it mutates leaves that may require grad), and the
    written tensors' version counters are bumped as any in-place op would.
    """
    written = tensors if outs is None else outs
    grad = torch.is_grad_enabled()
    if grad:
        torch.set_grad_enabled(False)
    try:
        if _plain(tensors) and (outs is None or _plain(outs)):
            backend.run(tensors, outs, a, b, seed, keys, offsets, noise, load_x, round_seed)
            bump_versions(written)
            return
        if isinstance(seed, torch.Tensor):
            raise TypeError("a seed in device memory (a CUDA graph's) is for a backend's own launches on plain "
                            "tensors, not for the fastmezo operators")
        install(tensors[0].device)
        if outs is None:
            torch.ops.fastmezo.scale_add_noise_(tensors, a, b, _schema_int(seed), keys, offsets, noise, load_x,
                                                _schema_int(round_seed))
        else:
            torch.ops.fastmezo.scale_add_noise_out(tensors, outs, a, b, _schema_int(seed), keys, offsets, noise,
                                                   _schema_int(round_seed))
    finally:
        if grad:
            torch.set_grad_enabled(True)


def _pair_delta(plus, minus):
    """The element distance from every plus output to its minus output when it is one for all (one
    dtype and device, the same byte distance), else None."""
    p0, m0 = plus[0], minus[0]
    size = p0.element_size()
    delta = m0.data_ptr() - p0.data_ptr()
    if delta % size:
        return None
    for p, m in zip(plus, minus):
        if (p.dtype != p0.dtype or m.dtype != p0.dtype or p.device != p0.device or m.device != p0.device
                or m.data_ptr() - p.data_ptr() != delta):
            return None
    return delta // size


def run_pair(backend, tensors, plus, minus, b, seed: int, keys, offsets, noise: int,
             round_seed: Optional[int] = None) -> None:
    """plus[i] <- tensors[i] + b[i] * z_i and minus[i] <- tensors[i] - b[i] * z_i: the out-of-place pass
    with b and with -b, bit for bit (b * z negated is exact), over validated, non-empty tensors of one
    device. A backend that writes pairs (``PAIRS``) makes z once for both in one pass when every minus
    output lies the same number of elements after its plus output; otherwise two passes."""
    n = len(tensors)
    ones = [1.0] * n
    delta = _pair_delta(plus, minus) if getattr(backend, "PAIRS", False) else None
    if delta is None or not (_plain(tensors) and plain(plus) and plain(minus)):
        run(backend, tensors, plus, ones, b, seed, keys, offsets, noise, True, round_seed)
        run(backend, tensors, minus, ones, [-x for x in b], seed, keys, offsets, noise, True, round_seed)
        return
    grad = torch.is_grad_enabled()
    if grad:
        torch.set_grad_enabled(False)
    try:
        backend.run(tensors, plus, ones, b, seed, keys, offsets, noise, True, round_seed, pair_delta=delta)
        bump_versions(list(plus) + list(minus))
    finally:
        if grad:
            torch.set_grad_enabled(True)
