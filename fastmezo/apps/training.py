"""The parts of a training run that every method of the comparison shares: the mini-batch sampler
(:func:`batches`, data parallel included), the step loop under a progress display (:func:`_loop`,
with :class:`LineProgress` for output that is not a terminal) and checkpoint selection on dev
(:class:`BestOnDev`).

Apart from the methods themselves (:mod:`fastmezo.apps.baselines`, :mod:`fastmezo.apps.mezo_methods`)
because both kinds train through them, and apart from :mod:`fastmezo.apps.runner` because they know
nothing of how a method is built or measured.
"""
from __future__ import annotations

import sys
import time

import torch


def batches(examples, batch_size, seed, rank=0, world_size=1):
    """Endless shuffled mini-batches (epoch by epoch) as (inputs, labels), from a fixed seed. Data
    parallel: every rank draws the same global batch of ``batch_size * world_size`` examples and keeps
    its own slice, so the ranks together see what one process sees at the global batch size."""
    import random
    rng = random.Random(seed)
    order = list(range(len(examples)))
    size = min(batch_size * world_size, len(examples)) // world_size  # per rank
    if size < 1:
        raise ValueError(f"{len(examples)} training examples cannot give each of {world_size} ranks a batch")
    total = size * world_size
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - total + 1, total):  # drop the last partial batch
            chunk = [examples[j] for j in order[i + rank * size:i + (rank + 1) * size]]
            yield [x for x, _ in chunk], [y for _, y in chunk]


class LineProgress:
    """Progress for output that is not a terminal (a log file, a pipe): one plain line at every tenth
    of the steps, where a bar would write a carriage return per update."""

    def __init__(self, total, desc, stream=None):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.stream = stream or sys.stderr
        self.every = max(1, -(-total // 10))

    def set_postfix(self, refresh=False, **values):
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n=1):
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            print(f"{self.desc}: step {self.n}/{self.total}" + (f", {self.postfix}" if self.postfix else ""),
                  file=self.stream, flush=True)

    def close(self):
        pass


def _progress(total, desc, enabled):
    """A tqdm bar when stderr is a terminal, plain lines (LineProgress) when it is not, or None."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return LineProgress(total, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return LineProgress(total, desc)
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)


def _loop(steps, desc, setup, step_fn):
    """Run ``step_fn(step) -> loss`` ``steps`` times under a progress bar; returns the losses. After
    each step, ``setup.monitor`` (if any) may evaluate and checkpoint the weights."""
    bar = _progress(steps, desc, setup.progress)
    losses = []
    try:
        for step in range(1, steps + 1):
            losses.append(float(step_fn(step)))
            if setup.monitor is not None:
                setup.monitor(step, last=step == steps)
            if bar is not None:
                recent = losses[-50:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}", refresh=False)  # shown by update
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return losses


class BestOnDev:
    """Checkpoint selection on dev, the paper's protocol (its runs evaluate every ``eval_steps`` and load
    the best model at the end): every ``every`` steps and after the last one, the trained weights
    (requires_grad) are evaluated on ``dev``; the best so far are saved to ``path`` on disk (kept out of
    memory, where they would count in the method's peak) and loaded back by :meth:`restore`.

    Evaluation runs at the training batch size, so its memory is that of a training forward; its time
    (and the saving) is kept in :attr:`seconds`, which run_method takes out of the training time.
    ``curve`` holds (step, dev accuracy); ``best_step`` the step restored."""

    def __init__(self, module, accuracy, dev, every, batch_size, path):
        self.module, self.accuracy, self.dev = module, accuracy, dev
        self.every, self.batch_size, self.path = every, batch_size, path
        self.curve: list = []
        self.best_acc = self.best_step = None
        self.seconds = 0.0

    def _trained(self):
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def __call__(self, step, last=False):
        if step % self.every and not last:
            return
        start = time.perf_counter()
        acc = self.accuracy(self.dev, self.batch_size)
        self.curve.append((step, acc))
        if self.best_acc is None or acc > self.best_acc:
            self.best_acc, self.best_step = acc, step
            torch.save({n: p.detach().cpu() for n, p in self._trained().items()}, self.path)
        self.seconds += time.perf_counter() - start

    def restore(self):
        """Load the best checkpoint's weights into the module (nothing to do if it is the last)."""
        if self.best_step is None or self.best_step == self.curve[-1][0]:
            return
        state = torch.load(self.path, map_location="cpu")
        with torch.no_grad():
            for name, p in self._trained().items():
                p.copy_(state[name])
