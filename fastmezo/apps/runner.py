"""One method of the comparison, from fresh pretrained weights to its metrics: :class:`Setup` (what
every method needs: the task, the model, the device, the shared training options) and
:func:`run_method`, which builds the method (:mod:`fastmezo.apps.baselines`,
:mod:`fastmezo.apps.mezo_methods`), trains it inside a :class:`fastmezo.apps.memory.PeakMemory`
window, evaluates it on dev and test and reports which parameter tensors changed.

All forwards run in eval mode (dropout off), backpropagation included, so that the methods differ
by their optimizer and trained weights only. Apart from the methods' table
(:mod:`fastmezo.apps.methods`), which the command line reads without loading any of this.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from .baselines import _build_ft_adam, _build_icl, _build_linear_probe, _build_zero_shot
from .memory import PeakMemory
from .methods import METHODS
from .mezo_methods import _build_mezo, _build_mezo_lora, _build_mezo_nondiff, _build_mezo_prefix
from .prompt_model import PromptClassifier, load_encoder
from .training import BestOnDev


@dataclass
class Setup:
    """What every method needs: the task, the model, the device and the shared training options."""
    splits: dict
    template: str
    label_texts: tuple
    model_path: object = None
    device: str = "cpu"
    seed: int = 0
    batch_size: int = 16
    temperature: float = 20.0
    trainable: str = "all"
    mezo_mode: str = "inplace"    # "paired": mezo's two forwards as one over the doubled batch
    weight_decay: float = 0.0
    dev_limit: int | None = None
    progress: bool = True
    eval_every: int = 0           # checkpoint selection on dev every N steps (0: keep the last weights)
    scratch_dir: str | None = None  # where the best checkpoint goes (None: the system's temp folder)
    trajectory_dir: str | None = None  # MeZO methods write trajectory-<method>.jsonl here (None: not)
    kind: str = "encoder"         # "causal": label-word scoring with a causal LM (apps.causal_lm)
    monitor: object = None        # set by run_method: the BestOnDev of the method being trained
    rank: int = 0                 # data parallel (apps.parallel): this process's rank, and how many
    world_size: int = 1           # train together; rank 0 alone evaluates and checkpoints


def fingerprints(module):
    """name -> hash of the tensor's bytes, for every parameter: tells exactly which tensors changed,
    without keeping a copy of the weights (which would distort the memory measurement)."""
    out = {}
    for name, p in module.named_parameters():
        raw = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bf16 included
        out[name] = hashlib.blake2b(raw.numpy(), digest_size=16).hexdigest()
    return out


_BUILDERS = {"zero-shot": _build_zero_shot, "icl": _build_icl, "linear-probe": _build_linear_probe, "mezo": _build_mezo,
             "mezo-lora": _build_mezo_lora, "mezo-prefix": _build_mezo_prefix,
             "mezo-nondiff": _build_mezo_nondiff, "ft-adam": _build_ft_adam}


def run_method(name, setup: Setup, hp: dict) -> dict:
    """Build method ``name`` from fresh pretrained weights, train it as ``hp`` says (measuring time and
    peak memory of the training only), evaluate on dev and test; returns a dict of metrics."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    torch.manual_seed(setup.seed)  # LoRA and the linear head draw their init from torch's generator
    setup = copy_setup(setup, monitor=None)   # the builders' closures read setup.monitor, set below
    clf = build_classifier(setup)
    module, train, accuracy = _BUILDERS[name](clf, setup, hp)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in module.parameters())
    before = fingerprints(module)
    dev = setup.splits["dev"][:setup.dev_limit] if setup.dev_limit else setup.splits["dev"]

    evaluate = setup.rank == 0  # data parallel: the replicas are identical, one evaluation is enough
    with tempfile.TemporaryDirectory(prefix="fastmezo-best-", dir=setup.scratch_dir) as tmp:
        if evaluate and setup.eval_every and name not in ("zero-shot", "icl"):
            setup.monitor = BestOnDev(module, accuracy, dev, setup.eval_every, setup.batch_size,
                                      os.path.join(tmp, "best.pt"))
        with PeakMemory(setup.device) as mem:
            start = time.perf_counter()
            losses = train()
            if torch.device(setup.device).type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        monitor = setup.monitor
        if monitor is not None:
            seconds -= monitor.seconds
            monitor.restore()

    start = time.perf_counter()
    dev_acc = test_acc = math.nan
    if evaluate:
        # The restored checkpoint's dev accuracy is the one selection measured (same weights, same
        # batches); without selection, dev is evaluated here.
        dev_acc = monitor.best_acc if monitor is not None else accuracy(dev)
        test_acc = accuracy(setup.splits["test"])
    eval_seconds = time.perf_counter() - start
    after = fingerprints(module)
    changed = [n for n in after if after[n] != before[n]]
    steps = hp.get("steps", 0) if name not in ("zero-shot", "icl") else 0
    return dict(
        method=name, title=METHODS[name].title, hparams=dict(hp), steps=steps,
        dev_acc=dev_acc, n_dev=len(dev), test_acc=test_acc, n_test=len(setup.splits["test"]),
        train_seconds=seconds, seconds_per_step=seconds / steps if steps else None, eval_seconds=eval_seconds,
        peak_mib=mem.peak_mib, extra_mib=mem.extra_mib, start_mib=mem.start_mib, memory_kind=mem.kind,
        trainable_params=n_trainable, total_params=n_total, trainable_tensors=trainable,
        changed_tensors=changed, losses=losses,
        eval_every=monitor.every if monitor else 0, best_step=monitor.best_step if monitor else None,
        dev_curve=monitor.curve if monitor else [],
        final_loss=(sum(losses[-20:]) / len(losses[-20:])) if losses else math.nan,
    )


def build_classifier(setup: Setup):
    """A fresh classifier from the pretrained weights: label-word scoring for a causal LM, cosine to
    label sentences for an encoder."""
    if setup.kind == "causal":
        from .causal_lm import LabelWordClassifier, load_causal_lm
        model, tokenizer = load_causal_lm(setup.model_path, setup.device)
        return LabelWordClassifier(model, tokenizer, setup.template, setup.label_texts)
    encoder, tokenizer = load_encoder(setup.model_path, setup.device)
    return PromptClassifier(encoder, tokenizer, template=setup.template, label_texts=setup.label_texts,
                            temperature=setup.temperature)


def copy_setup(setup: Setup, **changes) -> Setup:
    """A copy of ``setup`` with some fields changed."""
    new = copy.copy(setup)
    for k, v in changes.items():
        setattr(new, k, v)
    return new
