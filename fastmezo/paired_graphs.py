"""CUDA graphs of paired forwards: one launch for the whole forward instead of thousands.

At small batches a paired step is bound by host time: the Python of every wrapped module, a pair pass
and a batched matmul per module call, each a kernel launch (docs/perf.md). The GPU work of a paired
forward is the same every step but for the seed, so :class:`ForwardGraphs` captures it once per batch
signature and replays it. The step's seed goes into a device tensor that every captured launch of the
copies reads when it runs (PairedPerturbation.seeded_from), the batch into the graph's static inputs;
the replay makes bit for bit the copies an eager forward at that seed makes.

When: PairedPatch's own loss (a dict batch with labels, fastmezo.paired_batch.half_losses), every
tensor of the batch and of the plan on one CUDA device, the Triton backend, the fused kernel automatic
(the Hopper kernel only, which reads the seed from device memory), off, or asked for where the Hopper
kernel takes every matrix (fastmezo.paired_linear.fused_capturable), at
most MAX_TOKENS labels in the doubled batch (small batches, where the host is what a step waits for). A
user's ``loss_fn`` or closure runs eagerly: it may hold host state that a replay would not see. The first
WARMUP_STEPS steps of a signature run eagerly (they fill the caches: launch tables, cuBLAS handles, the
first forward's read check), the next one captures and replays, later ones replay. A capture that fails (something in
the forward waits for the GPU or reads a value on the host) touched no weight, since a paired forward
writes none: that signature runs eagerly from then on, after a one-line notice.

A graph holds what it reads: its static inputs, the seed tensor, the forward's intermediates (its memory
pool), the prepared launches it captured (their device tables) and the small tensors' held copies. It
is valid while the model's tensors stay where they are: its key holds the address of every parameter
and buffer, the plan, every tensor's eps, the batch's shapes, strides and dtypes, and the grad and
autocast state.
"""
from __future__ import annotations

import warnings

import torch

from .paired_linear import _paused, fused_capturable

#: Doubled batches of more elements in their labels (rows x tokens) run eagerly: there the forward's
#: matmuls keep the GPU busy longer than the host takes to launch them, so a graph saves nothing, while
#: its memory pool holds the forward's intermediates between steps and transformers builds an explicit
#: attention mask while a stream captures (docs/perf.md).
MAX_TOKENS = 2048

#: Eager steps of a signature before it is captured: the first forward of a provider makes each large
#: tensor's copies by a pass of its own and records the order in which they are asked for; from the
#: second on, copies are made in groups by that order (fastmezo.paired_copies), whose launches are then
#: prepared, so that a capture finds every launch table made.
WARMUP_STEPS = 2

#: Batch signatures (shapes) a handle tracks: each of the first MAX_SHAPES gets its graph, later ones run
#: eagerly (a loader of many lengths would otherwise pay warm-up steps and a capture for shapes that
#: may never come again). The graphs of a handle share one memory pool, so more of them cost their static
#: inputs, not another forward's intermediates.
MAX_SHAPES = 16

_MISSING = object()


class _Captured:
    """A captured paired forward and what its replay reads and writes."""

    # kept: the device tables of its launches; held: the small tensors' copy buffers it writes; plan:
    # held so that no other plan takes its id, which the graph's key holds.
    def __init__(self, graph, inputs, labels, words, out, kept, held, plan, paths):
        self.graph, self.inputs, self.labels, self.words, self.out = graph, inputs, labels, words, out
        self.kept, self.held, self.plan, self.paths = kept, held, plan, paths
        # The seed's words go through pinned memory: a copy that needs no wait for the stream.
        self.host_words = torch.empty(2, dtype=torch.int32, pin_memory=words.device.type == "cuda")

    def replay(self, inputs: dict, labels, seed: int):
        from .kernels.axpbz import seed_words
        for name, static in self.inputs.items():
            if isinstance(static, torch.Tensor):
                static.copy_(inputs[name], non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        # Each step reads its losses on the host before the next one starts, so this step's copy out of
        # host_words has run before they are written again.
        self.host_words.numpy()[:] = seed_words(seed)
        self.words.copy_(self.host_words, non_blocking=True)
        self.graph.replay()
        return tuple(o.clone() for o in self.out)


def _cuda_capture(run, pool):
    """(graph, outputs) of ``run`` captured on the current CUDA device."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = run()
    return graph, out


def _signature(value):
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device)
    hash(value)                 # a value that cannot be hashed cannot be compared with a captured one
    return ("value", type(value), value)


class ForwardGraphs:
    """The CUDA graphs of a paired-mode provider's forwards (see the module docstring).

    ``capture(run, pool) -> (graph, outputs)`` is how a graph is made (default: torch.cuda.graph) and
    ``device_types`` where (tests give a stand-in that runs on the CPU); a graph has ``replay()``.
    ``max_tokens``: the most labels of a doubled batch that is captured; ``warmup``: eager steps of a
    signature before its capture; ``max_shapes``: signatures tracked (later ones run eagerly).
    :attr:`captured`, :attr:`replayed`, :attr:`failed` count what happened."""

    def __init__(self, provider, model, capture=None, device_types=("cuda",), max_tokens: int = MAX_TOKENS,
                 warmup: int = WARMUP_STEPS, max_shapes: int = MAX_SHAPES):
        self.provider, self.model, self.device_types = provider, model, tuple(device_types)
        self.max_tokens, self.warmup, self.max_shapes = max_tokens, warmup, max_shapes
        self.graphs: dict = {}                       # key -> _Captured, or None where the capture failed
        self._seen: dict = {}                        # key -> its eager steps so far: the tracked signatures
        self._capture = _cuda_capture if capture is None else capture
        self._pool = None
        self.captured = self.replayed = self.failed = 0
        self.shapes_full = False                     # max_shapes signatures tracked: new ones run eagerly

    def losses(self, inputs: dict, labels, forward):
        """(l+, l-) of ``forward(inputs, labels)`` (the doubled batch), run eagerly, captured or replayed;
        called inside the provider's perturbation."""
        key = self._key(inputs, labels)
        if key is None:
            return forward(inputs, labels)
        entry = self.graphs.get(key, _MISSING)
        if entry is _MISSING:
            seen = self._seen.get(key)
            if seen is None and len(self._seen) >= self.max_shapes:
                if not self.shapes_full:
                    self.shapes_full = True
                    warnings.warn(f"paired mode: more than {self.max_shapes} batch shapes; new ones run without "
                                  "CUDA graphs (pad batches to a few lengths to keep them)", stacklevel=4)
                return forward(inputs, labels)
            if (seen or 0) < self.warmup:
                self._seen[key] = (seen or 0) + 1
                return forward(inputs, labels)
            entry = self._captured(key, inputs, labels, forward)
        if entry is None:
            return forward(inputs, labels)
        self.provider.paths = dict(entry.paths)
        self.replayed += 1
        return entry.replay(inputs, labels, self.provider._active[1])

    def clear(self) -> None:
        """Drop every graph (and what it holds)."""
        self.graphs.clear()
        self._seen.clear()
        self.shapes_full = False

    def _key(self, inputs, labels):
        """The key of a graph of this forward, or None where it runs eagerly."""
        provider = self.provider
        plan, seed, entries = provider._active
        if not isinstance(seed, int) or not isinstance(labels, torch.Tensor) or labels.numel() > self.max_tokens:
            return None
        device = labels.device
        if provider.max_rows > 0 and not provider.fused_auto:    # the automatic choice: always capturable
            with _paused(provider._checker):       # fastmezo's own look at the weights' dtypes
                if not fused_capturable(plan, device):
                    return None
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        if (device.type not in self.device_types or any(t.device != device for t in tensors)
                or any(t.device != device for t in plan.tensors)
                or getattr(plan.backend_of(device), "NAME", None) != "triton"):
            return None
        try:
            batch = tuple((name, _signature(v)) for name, v in inputs.items())
        except TypeError:
            return None
        model = self.model
        with _paused(provider._checker):       # the first forward's read check: these are fastmezo's reads
            places = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
        return (batch, _signature(labels), id(plan), plan.noise, tuple(e[2] for e in entries.values()), places,
                torch.is_grad_enabled(), torch.is_autocast_enabled(device.type))

    def _captured(self, key, inputs, labels, forward):
        from .kernels.axpbz import keeping, seed_words
        provider = self.provider
        plan, seed, _ = provider._active
        static = {name: v.clone() if isinstance(v, torch.Tensor) else v for name, v in inputs.items()}
        static_labels = labels.clone()
        words = torch.tensor(seed_words(seed), dtype=torch.int32).to(labels.device)
        kept: list = []
        if self._pool is None and labels.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with provider.seeded_from(words), keeping(kept):
                graph, out = self._capture(lambda: forward(static, static_labels), self._pool)
        except Exception as exc:  # noqa: BLE001  (whatever the forward raised while captured: it runs eagerly)
            self.graphs[key] = None
            self.failed += 1
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(f"paired mode: this batch's forward could not be captured in a CUDA graph "
                          f"({type(exc).__name__}: {reason[:200]}); it runs eagerly", stacklevel=4)
            return None
        entry = _Captured(graph, static, static_labels, words, tuple(out), kept, list(provider._held.values()),
                          plan, dict(provider.paths))
        self.graphs[key] = entry
        self.captured += 1
        return entry
