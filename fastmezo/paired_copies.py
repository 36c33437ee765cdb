"""The perturbed copies of one paired forward: round(W + eps*z) for the + half, round(W - eps*z) for the -.

A copy is made by the contract's out-of-place pass (the plan's backend, the contract's seed, key and
offset: the arithmetic exact mode's copies have), so both halves see exactly what exact mode's two
forwards see. The two copies of a tensor come from ONE pass that makes z once and writes both
(fastmezo.ops.run_pair, where the backend has it): making z is what a pass spends its time on, and
the - copy is needed right after the + one (a module runs its + half, then its - half). No float32 z
of a whole tensor is ever stored.

What is alive when: a module's + half makes both halves' copies and keeps the - ones until its - half
takes them (:meth:`ForwardCopies.for_half`), so a module holds two copies of its weights during its
own call and none after. Small tensors (biases, norms' weights: at most SMALL_NUMEL elements) are
made for the whole forward by one pass per device at its first request for a copy, into buffers held
from one forward to the next (a transformer has hundreds of them; a launch and views per module and
half cost host time where a few megabytes of copies cost little).
"""
from __future__ import annotations

import torch

from . import ops

#: Trained tensors of at most this many elements are perturbed for both halves once per forward, up to
#: SMALL_TOTAL elements in all (:meth:`ForwardCopies._small_copies`).
SMALL_NUMEL = 1 << 16
SMALL_TOTAL = 1 << 24

#: Bytes of one copy made at a time: of a run of modules' weights made ahead by one pass
#: (:meth:`ForwardCopies.stacked`), or of a slab of a larger weight (fastmezo.paired_linear). With the
#: other half's copy, the memory that copies add to a forward is at most twice this.
MAX_COPY_BYTES = 1 << 28

# Copies carved from one buffer start at multiples of this many elements (16-byte aligned in every
# dtype), so the pass takes its vector path.
_ALIGN = 64


#: Prepared pair launches by content (the backend, the tensors' addresses, sizes, keys and offsets):
#: (prepared, starts of the copies in a half, half length). A training loop perturbs the same tensors every forward.
_prepared: dict = {}
_CAPACITY = 4096


def pair_buffer(half: int, dtype, device) -> torch.Tensor:
    """A 1-D buffer for two copies of ``half`` elements each (at least 2 * half elements). While a CUDA
    graph captures, a large one (a copy above MAX_COPY_BYTES / 2) takes the size of the largest,
    2 * MAX_COPY_BYTES: a graph's memory pool keeps a block of every size it ever held, so one size
    lets one block serve every large pair of the forward in turn (fastmezo.paired_graphs)."""
    size = dtype.itemsize
    elements = 2 * half
    if (2 * half * size > MAX_COPY_BYTES and torch.device(device).type == "cuda"
            and torch.cuda.is_current_stream_capturing()):
        elements = max(elements, 2 * MAX_COPY_BYTES // size)
    return torch.empty(elements, dtype=dtype, device=device)


def _layout(tensors):
    """(starts, half length) of a pair buffer: each + copy at a multiple of _ALIGN elements, the - copies
    at the same offsets in the second half."""
    starts, total = [], 0
    for t in tensors:
        starts.append(total)
        total += -(-t.numel() // _ALIGN) * _ALIGN
    return starts, total


class ForwardCopies:
    """The copies of one paired forward of ``plan`` at ``seed``; ``entries`` maps id(tensor) to its
    (key, offset, eps)."""

    def __init__(self, plan, seed, entries: dict, held: dict | None = None, order=()):
        # seed: the step's uint64, or an int32 tensor of its words on the device (a CUDA graph's
        # capture: fastmezo.paired_graphs), for the backend's launches to read
        self.plan, self.seed, self.entries = plan, seed, entries
        self.kept: dict = {}          # module -> its - copies, made with its + ones, until its - half
        self._held = {} if held is None else held
        self._small = None
        #: the tensors asked for by :meth:`stacked`, in order (the next forward's ``order``)
        self.asked: list = []
        self._order = order
        self._position = {id(t): i for i, t in enumerate(order)}
        self._ready: dict = {}        # id(tensor) -> its stacked copies, made ahead with an earlier one

    @property
    def small(self) -> dict:
        """The small tensors' copies, made by the forward's first call that asks for any copy (so that
        whatever runs the forward, a CUDA graph's capture too, runs their pass)."""
        if self._small is None:
            self._small = self._small_copies(self._held)
        return self._small

    def for_half(self, module, tensors, sign: int) -> list:
        """The copies of ``module``'s ``tensors`` for one half: the + half makes both halves' copies and
        keeps the - ones for the module's - half, which takes them; a - half without kept copies (a
        module called in the - half only) makes its own. Copies depend only on the tensors within a
        forward, so a kept copy is right for any later call of the module."""
        if sign < 0:
            kept = self.kept.pop(module, None)
            if kept is not None and kept[0] == [id(t) for t in tensors]:
                return kept[1]
            return self.copies(tensors, [-1] * len(tensors))
        plus, minus = self.pairs(tensors)
        self.kept[module] = ([id(t) for t in tensors], minus)
        return plus

    def copies(self, tensors, signs) -> list:
        """round(t + sign * eps * z) of each tensor (the small ones from the forward's own copies)."""
        small = self.small
        rest = [i for i, t in enumerate(tensors) if id(t) not in small]
        made = iter(self._made([tensors[i] for i in rest], [signs[i] for i in rest]) if rest else ())
        return [small[id(t)][0 if s > 0 else 1] if id(t) in small else next(made) for t, s in zip(tensors, signs)]

    def pairs(self, tensors):
        """(+ copies, - copies) of the tensors, the large ones by one pair pass."""
        small = self.small
        rest = [t for t in tensors if id(t) not in small]
        made = self._made_pairs(rest) if rest else []
        plus, minus = iter([b[0] for b in made]), iter([b[1] for b in made])
        pairs = [small[id(t)][:2] if id(t) in small else (next(plus), next(minus)) for t in tensors]
        return [p for p, _ in pairs], [m for _, m in pairs]

    def stacked(self, t):
        """Both copies of ``t`` as one [2, *t.shape] tensor (the + copy at 0), for batched matmuls; a view
        of the pair buffer where there is one. The tensors asked for after ``t`` in the previous
        forward (``order``) get their copies made by the same pass, up to MAX_COPY_BYTES a copy,
        and wait for their own call: one launch for several modules (a transformer layer's attention
        projections), whose host time is what a paired step is bound by. A tensor whose turn does not
        come (another order this time) only costs its copies' memory until the forward ends."""
        made = self.small.get(id(t))
        if made is not None:
            return made[2]
        self.asked.append(t)
        ready = self._ready.pop(id(t), None)
        if ready is not None:
            return ready
        group, total = [t], t.numel() * t.element_size()
        i = self._position.get(id(t))
        if i is not None:
            for u in self._order[i + 1:]:
                if (id(u) in self._ready or id(u) not in self.entries or u.device != t.device or u.dtype != t.dtype
                        or total + u.numel() * u.element_size() > MAX_COPY_BYTES):
                    break
                group.append(u)
                total += u.numel() * u.element_size()
        both = self._made_pairs(group)
        self._ready.update((id(u), b) for u, b in zip(group[1:], both[1:]))
        return both[0]

    def _made(self, tensors, signs) -> list:
        """round(t + sign * eps * z) by one call of the out-of-place pass (per device)."""
        device = tensors[0].device
        if any(t.device != device for t in tensors):
            return [self._made([t], [s])[0] for t, s in zip(tensors, signs)]
        entries = [self.entries[id(t)] for t in tensors]
        outs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops.run(self.plan.backend_of(device), [t.contiguous() for t in tensors], outs, [1.0] * len(tensors),
                [s * e[2] for s, e in zip(signs, entries)], self.seed, [e[0] for e in entries],
                [e[1] for e in entries], self.plan.noise)
        return outs

    def _made_pairs(self, tensors) -> list:
        """Both copies of each tensor as one [2, *shape] tensor (the + copy at 0) by one pair pass: views
        of one buffer whose second half holds the - copies at the + copies' offsets (what the pair pass
        needs), or stacked copies where the tensors mix devices or dtypes."""
        device, dtype = tensors[0].device, tensors[0].dtype
        if any(t.device != device or t.dtype != dtype for t in tensors):
            n = len(tensors)
            made = self._made(list(tensors) + list(tensors), [+1] * n + [-1] * n)
            return [torch.stack(pm) for pm in zip(made[:n], made[n:])]
        key = self._content_key(tensors)
        if key is None:
            entries = [self.entries[id(t)] for t in tensors]
            both = self._buffer_views(tensors, *_layout(tensors))[1]
            self.pair_pass([t.contiguous() for t in tensors], [b[0] for b in both], [b[1] for b in both],
                           [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries])
            return both
        write, buffer, both = self._pair_buffer(tensors, key)
        write(self.entries[id(tensors[0])][2], self.seed, buffer)
        return both

    def _content_key(self, tensors):
        """The key of a pair launch over ``tensors`` (one device and dtype): everything its table holds
        (where each tensor is, its size, key and offset); None where it cannot be prepared and kept
        (eps differs between them, a subclass, tracing, a non-contiguous tensor)."""
        entries = [self.entries[id(t)] for t in tensors]
        if (any(e[2] != entries[0][2] for e in entries) or not ops.plain(tensors) or ops.tracing()
                or not all(t.is_contiguous() for t in tensors)):
            return None
        return (tensors[0].device, tensors[0].dtype, self.plan.noise, self.plan.backend_of(tensors[0].device),
                tuple((t.data_ptr(), t.numel(), e[0], e[1]) for t, e in zip(tensors, entries)))

    @staticmethod
    def _buffer_views(tensors, starts, total):
        """(a new pair buffer, the [2, *shape] view of each tensor's pair in it)."""
        buffer = pair_buffer(total, tensors[0].dtype, tensors[0].device)
        halves = buffer[:2 * total].view(2, total)
        return buffer, [halves[:, s:s + t.numel()].view((2,) + tuple(t.shape)) for s, t in zip(starts, tensors)]

    def _pair_buffer(self, tensors, key):
        """(write, buffer, views): a new pair buffer for ``tensors`` and ``write(eps, seed, buffer)``,
        which fills it. A backend that prepares pair passes gets its launch prepared once per key
        (:data:`_prepared`) and relocated into each buffer; another runs ops.run_pair into these views."""
        backend = self.plan.backend_of(tensors[0].device)
        hit = _prepared.get(key)
        starts, total = hit[1:] if hit is not None else _layout(tensors)
        buffer, both = self._buffer_views(tensors, starts, total)
        entries = [self.entries[id(t)] for t in tensors]
        keys, offsets = [e[0] for e in entries], [e[1] for e in entries]
        if hit is None and getattr(backend, "prepare_pair", None) is not None:
            if len(_prepared) >= _CAPACITY:
                _prepared.pop(next(iter(_prepared)))
            prepared = backend.prepare_pair(tensors, [b[0] for b in both], keys, offsets, self.plan.noise, total)
            hit = _prepared[key] = (prepared, starts, total)
        if hit is not None:
            return hit[0], buffer, both
        plus, minus, noise = [b[0] for b in both], [b[1] for b in both], self.plan.noise

        def write(eps, seed, _buffer):
            ops.run_pair(backend, tensors, plus, minus, [eps] * len(tensors), seed, keys, offsets, noise)
        return write, buffer, both

    def pair_pass(self, sources, plus, minus, keys, offsets, eps) -> None:
        """plus_i / minus_i <- round(source_i +- eps_i * z) over the stream of keys_i from offsets_i
        (fastmezo.ops.run_pair): the pass behind every pair of copies, also for pieces of a tensor."""
        ops.run_pair(self.plan.backend_of(sources[0].device), sources, plus, minus, eps, self.seed, keys, offsets,
                     self.plan.noise)

    def _small_copies(self, held: dict) -> dict:
        """{id(tensor): (+ copy, - copy, both stacked)} of the trained tensors of at most SMALL_NUMEL
        elements, up to SMALL_TOTAL elements in all, by one pair pass per device and dtype. Their buffers
        are ``held`` (the provider's, by content key) from one forward to the next and written again in
        place: the launch alone, without carving hundreds of views every forward. The next forward's pass
        is queued after this forward's reads on the same stream."""
        groups: dict = {}
        total = 0
        for t in self.plan.tensors:
            if id(t) in self.entries and t.numel() <= SMALL_NUMEL and total + t.numel() <= SMALL_TOTAL:
                groups.setdefault((t.device, t.dtype), []).append(t)
                total += t.numel()
        copies, keep = {}, {}
        for tensors in groups.values():
            key = self._content_key(tensors)
            if key is None:
                made = {id(t): (b[0], b[1], b) for t, b in zip(tensors, self._made_pairs(tensors))}
            else:
                entry = keep[key] = held.get(key) or self._held_entry(tensors, key)
                write, buffer, made = entry
                write(self.entries[id(tensors[0])][2], self.seed, buffer)
            copies.update(made)
        held.clear()
        held.update(keep)
        return copies

    def _held_entry(self, tensors, key):
        """(write, buffer, {id(tensor): (+ copy, - copy, both)}) of a new held buffer."""
        write, buffer, both = self._pair_buffer(tensors, key)
        return write, buffer, {id(t): (b[0], b[1], b) for t, b in zip(tensors, both)}
