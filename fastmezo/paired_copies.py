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
made for the whole forward by one pass per device before it (a transformer has hundreds of them; a
launch per module and half costs host time where a few megabytes of copies cost little).
"""
from __future__ import annotations

import torch

from . import ops

#: Trained tensors of at most this many elements are perturbed for both halves once per forward, up to
#: SMALL_TOTAL elements in all (:meth:`ForwardCopies._small_copies`).
SMALL_NUMEL = 1 << 16
SMALL_TOTAL = 1 << 24

# Copies carved from one buffer start at multiples of this many elements (16-byte aligned in every
# dtype), so the pass takes its vector path.
_ALIGN = 64


class ForwardCopies:
    """The copies of one paired forward of ``plan`` at ``seed``; ``entries`` maps id(tensor) to its
    (key, offset, eps)."""

    def __init__(self, plan, seed: int, entries: dict):
        self.plan, self.seed, self.entries = plan, seed, entries
        self.kept: dict = {}          # module -> its - copies, made with its + ones, until its - half
        self.small = self._small_copies()

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
        plus, minus = self._made_pairs(rest) if rest else ([], [])
        plus, minus = iter(plus), iter(minus)
        pairs = [small[id(t)] if id(t) in small else (next(plus), next(minus)) for t in tensors]
        return [p for p, _ in pairs], [m for _, m in pairs]

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

    def _made_pairs(self, tensors):
        """Both copies of tensors of one device and dtype by one pair pass, carved from one buffer whose
        second half holds the - copies at the + copies' offsets (what the pair pass needs); otherwise
        a pass per tensor group and sign."""
        device, dtype = tensors[0].device, tensors[0].dtype
        if any(t.device != device or t.dtype != dtype for t in tensors):
            n = len(tensors)
            made = self._made(list(tensors) + list(tensors), [+1] * n + [-1] * n)
            return made[:n], made[n:]
        starts, total = [], 0
        for t in tensors:
            starts.append(total)
            total += -(-t.numel() // _ALIGN) * _ALIGN
        buffer = torch.empty(2 * total, dtype=dtype, device=device)
        plus = [buffer[s:s + t.numel()].view(t.shape) for s, t in zip(starts, tensors)]
        minus = [buffer[total + s:total + s + t.numel()].view(t.shape) for s, t in zip(starts, tensors)]
        entries = [self.entries[id(t)] for t in tensors]
        self.pair_pass([t.contiguous() for t in tensors], plus, minus, [e[0] for e in entries],
                       [e[1] for e in entries], [e[2] for e in entries])
        return plus, minus

    def pair_pass(self, sources, plus, minus, keys, offsets, eps) -> None:
        """plus_i / minus_i <- round(source_i +- eps_i * z) over the stream of keys_i from offsets_i
        (fastmezo.ops.run_pair): the pass behind every pair of copies, also for pieces of a tensor."""
        ops.run_pair(self.plan.backend_of(sources[0].device), sources, plus, minus, eps, self.seed, keys, offsets,
                     self.plan.noise)

    def _small_copies(self) -> dict:
        """{id(tensor): (+ copy, - copy)} of the trained tensors of at most SMALL_NUMEL elements, up to
        SMALL_TOTAL elements in all, by one pair pass per device and dtype."""
        groups: dict = {}
        total = 0
        for t in self.plan.tensors:
            if id(t) in self.entries and t.numel() <= SMALL_NUMEL and total + t.numel() <= SMALL_TOTAL:
                groups.setdefault((t.device, t.dtype), []).append(t)
                total += t.numel()
        copies = {}
        for tensors in groups.values():
            plus, minus = self._made_pairs(tensors)
            copies.update((id(t), (p, m)) for t, p, m in zip(tensors, plus, minus))
        return copies
