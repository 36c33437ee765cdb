"""The methods that the fine-tuning job compares (the MeZO paper's comparison, on one task).

Every method starts from the same pretrained encoder and the same prompt-style classifier
(:class:`fastmezo.apps.prompt_model.PromptClassifier`):

  zero-shot      the classifier as it is, no training.
  linear-probe   a linear head (logistic regression) on the frozen encoder's pooled features of the
                 templated input, trained by full-batch Adam on cross-entropy; the label sentences
                 are not used.
  mezo           MeZO (:func:`fastmezo.patch`) on the weights chosen by --trainable (default all: the
                 paper's full-parameter MeZO), cross-entropy loss.
  mezo-lora      MeZO on LoRA adapters from peft (r=8, alpha=16 on the attention query and value
                 projections, the paper's LoRA setting); the encoder's own weights are frozen.
  mezo-prefix    MeZO on prefix tuning from peft (5 virtual tokens: trainable keys and values
                 prepended in every attention layer); the prefix starts from the keys and values of
                 real tokens (the activations of ``prefix_init`` in the frozen encoder), as the paper
                 and Li & Liang (2021) do, rather than from peft's random init, which wrecks the
                 zero-shot accuracy of the prompt the fine-tuning starts from.
  mezo-nondiff   MeZO on a non-differentiable objective: the 0-1 loss (1 - accuracy) of the batch,
                 same weights as ``mezo``.
  ft-adam        fine-tuning by backpropagation with Adam, all weights (the memory and accuracy
                 baseline of the paper).

All forwards run in eval mode (dropout off), backpropagation included, so that the methods differ
by their optimizer and trained weights only. :func:`run_method` builds a method from scratch (fresh
weights), trains it inside a :class:`fastmezo.apps.memory.PeakMemory` window, evaluates it and
reports which parameter tensors changed.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastmezo

from .memory import PeakMemory
from .prompt_model import PromptClassifier, load_encoder, select_trainable


@dataclass(frozen=True)
class Method:
    """A method of the comparison: its name on the command line, its title in the table, whether it
    is trained by MeZO, and its default hyper-parameters per setting ("quick", "full")."""
    name: str
    title: str
    mezo: bool
    defaults: dict = field(default_factory=dict)


# Hyper-parameters ("steps" come from the setting, settings.SETTINGS). Not tuned by a sweep yet: eps
# is the paper's (1e-3 full-parameter, 1e-2 LoRA, 1e-1 prefix); mezo's lr 1e-4 is the one the
# single-method version of this job used for all weights (0.78 -> 0.865 test in 300 steps); LoRA's
# and prefix's lr keep the paper's ratios to full-parameter lr (x20, x100); the 0-1 loss's lr is
# smaller than mezo's because its projected gradient is large when it is not zero (one flipped
# prediction in a batch of 16 at eps 1e-3 gives g = 31); Adam's 2e-5 is the usual BERT fine-tuning
# rate. The prefix starts from the keys/values of "the word is" (dev accuracy at init 0.810, against
# 0.807 for "positive negative neutral word meaning", on 300 dev words). Tune on dev (--set) before
# trusting a comparison, the full setting above all.
# mezo's learning rate goes with the weights it trains (--trainable); bitfit's 2e-3 was tuned on dev by
# the single-method version of this job, top1's 1e-3 came from the same 1/tr(H) rule, not from runs.
MEZO_LR_BY_TRAINABLE = {"bitfit": 2e-3, "top1": 1e-3, "all": 1e-4}
# The full setting's 5000 steps need smaller rates: at the quick setting's, full-parameter MeZO, its
# 0-1 variant and LoRA improve for 500-2000 steps and then drift to chance (the weights random-walk
# along z); measured on the H200 (bench/results/h200-2026-11-29-finetune-no-selection) and on CPU
# (bench/results/cpu-2026-11-29-finetune-full-lr: MeZO all weights at 1e-4 / 5e-5 peaks at step 500
# and decays, at 1e-5 still improves at step 5000; LoRA at 2e-3 / 1e-3 collapses after 1000 / 3500
# steps, at 5e-4 improves to step 4500; the 0-1 loss at 1e-5 improves to step 5000). For --trainable all; bitfit and
# top1 keep their quick-setting rates (not measured over 5000 steps). Prefix tuning at 1e-2 improves
# to the end.
FULL_SETTING_LR = {"mezo": 1e-5, "mezo-nondiff": 1e-5, "mezo-lora": 5e-4}

METHODS = {m.name: m for m in (
    Method("zero-shot", "zero-shot (prompt, no training)", False, {}),
    Method("icl", "in-context learning (demonstrations in the prompt)", False, dict(demos=1)),
    Method("linear-probe", "linear probing (logistic regression, Adam)", False,
           dict(lr=1e-2, steps=300, weight_decay=1e-3)),
    Method("mezo", "MeZO", True, dict(lr=1e-4, eps=1e-3)),
    Method("mezo-lora", "MeZO LoRA (peft, r=8)", True, dict(lr=2e-3, eps=1e-2, r=8, alpha=16)),
    Method("mezo-prefix", "MeZO prefix (peft, 5 tokens)", True,
           dict(lr=1e-2, eps=1e-1, tokens=5, prefix_init="the word is")),
    Method("mezo-nondiff", "MeZO, 0-1 loss (non-differentiable)", True, dict(lr=3e-5, eps=1e-3)),
    Method("ft-adam", "fine-tuning, backprop + Adam (all weights)", False, dict(lr=2e-5)),
)}


#: Methods that need a causal LM (demonstrations in the prompt mean nothing to a sentence encoder).
CAUSAL_ONLY = ("icl",)


def methods_for(kind):
    """The methods of a model kind ("causal" or "encoder"), in table order."""
    return [m for m in METHODS if kind == "causal" or m not in CAUSAL_ONLY]


def parse_methods(text, kind="encoder"):
    """Method names from a comma-separated list ("all" = every method of the model ``kind``, in table
    order); raises ValueError naming an unknown method and listing the known ones."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    known = methods_for(kind)
    if not names:
        raise ValueError("--methods is empty; give a comma-separated list of " + ", ".join(known))
    if names == ["all"]:
        return known
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))} in --methods for a {kind} model; "
                         "known: " + ", ".join(known) + " (or 'all')")
    return list(dict.fromkeys(names))  # keep order, drop repeats


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


# -- helpers ---------------------------------------------------------------------------------------

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


def fingerprints(module):
    """name -> hash of the tensor's bytes, for every parameter: tells exactly which tensors changed,
    without keeping a copy of the weights (which would distort the memory measurement)."""
    out = {}
    for name, p in module.named_parameters():
        raw = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype, bf16 included
        out[name] = hashlib.blake2b(raw.numpy(), digest_size=16).hexdigest()
    return out


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


# -- the methods -----------------------------------------------------------------------------------
# Each builder takes (classifier, setup, hyper-parameters) and returns (module, train, accuracy):
# the module whose parameters are reported (trainable = requires_grad), train() -> list of losses,
# accuracy(examples) -> float.

def _build_zero_shot(clf, setup, hp):
    for p in clf.parameters():
        p.requires_grad_(False)
    sample = next(batches(setup.splits["train"], setup.batch_size, setup.seed))

    def train():
        # Nothing is trained; the measured window holds one forward of a training batch, so the
        # zero-shot row shows the inference memory that MeZO should match.
        with torch.no_grad():
            return [float(clf.loss(*sample))]
    return clf, train, clf.accuracy


def _build_icl(clf, setup, hp):
    from .causal_lm import demonstration_block
    clf.demonstrations = demonstration_block(setup.splits["train"], clf.template, clf.label_texts,
                                             hp["demos"], setup.seed)
    return _build_zero_shot(clf, setup, hp)


def _build_linear_probe(clf, setup, hp):
    for p in clf.parameters():
        p.requires_grad_(False)
    dim = clf.features(["x"]).shape[1]
    head = torch.nn.Linear(dim, len(clf.label_texts)).to(clf.device)
    module = torch.nn.ModuleDict(dict(classifier=clf, head=head))

    frozen = {}  # the encoder is frozen: dev's features, evaluated at every checkpoint, are computed once

    @torch.inference_mode()
    def features(examples, chunk=256):
        key = tuple(x for x, _ in examples)
        if key not in frozen:
            frozen.clear()  # one split at a time (dev during training): the cache stays small
            frozen[key] = torch.cat([clf.features([x for x, _ in examples[i:i + chunk]])
                                     for i in range(0, len(examples), chunk)])
        return frozen[key]

    def train():
        x = features(setup.splits["train"]).clone()  # out of inference mode, to train on
        y = torch.as_tensor([label for _, label in setup.splits["train"]], device=x.device)
        opt = torch.optim.Adam(head.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])

        def step(_):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(x), y)  # full batch: the train set is k-shot, small
            loss.backward()
            opt.step()
            return loss.item()
        return _loop(hp["steps"], "linear-probe", setup, step)

    @torch.inference_mode()
    def accuracy(examples, batch_size=256):
        if not examples:
            return float("nan")
        pred = head(features(examples, batch_size)).argmax(1).tolist()
        return sum(p == y for p, (_, y) in zip(pred, examples)) / len(examples)
    return module, train, accuracy


def _mezo_trainer(clf, setup, hp, name, objective):
    """train() for MeZO on clf's trainable (requires_grad) weights with the given objective."""
    def train():
        # The run's trajectory (kilobytes): with the base weights it rebuilds every step's weights
        # (fastmezo.replay; the best checkpoint is the trajectory cut at its step).
        trajectory = None
        if setup.trajectory_dir is not None and setup.rank == 0:  # replicas: one trajectory is the run's
            trajectory = os.path.join(setup.trajectory_dir, f"trajectory-{name.split()[0]}.jsonl")
        handle = fastmezo.patch(clf, lr=hp["lr"], eps=hp["eps"], weight_decay=setup.weight_decay,
                                seed=setup.seed, loss_fn=lambda model, batch: objective(*batch),
                                trajectory=trajectory)
        if setup.world_size > 1:
            # One all-reduce of the two losses a step; the replicas compared at every dev evaluation.
            fastmezo.data_parallel(handle, check_every=setup.eval_every or None)
        sampler = batches(setup.splits["train"], setup.batch_size, setup.seed, setup.rank, setup.world_size)

        def step(_):
            handle.step(next(sampler))
            opt = handle.optimizer
            # (l+ + l-)/2 estimates the loss at theta to second order in eps, for free.
            return 0.5 * (opt.loss_plus + opt.loss_minus)
        try:
            return _loop(hp["steps"], name, setup, step)
        finally:
            handle.remove()
    return train


def _build_mezo(clf, setup, hp):
    select_trainable(clf.encoder, setup.trainable)
    return clf, _mezo_trainer(clf, setup, hp, f"mezo ({setup.trainable})", clf.loss), clf.accuracy


def _build_mezo_nondiff(clf, setup, hp):
    select_trainable(clf.encoder, setup.trainable)
    return clf, _mezo_trainer(clf, setup, hp, "mezo-nondiff", clf.error_rate), clf.accuracy


def lora_target_modules(encoder):
    """The attention query and value projections, by the names that common encoders use."""
    leaves = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    for pair in (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("q", "v")):
        if set(pair) <= leaves:
            return list(pair)
    raise ValueError("mezo-lora: cannot find the attention query/value projections of this model "
                     f"(its Linear layers are named {sorted(leaves)})")


def _wrap_peft(encoder, config):
    from peft import get_peft_model
    with warnings.catch_warnings():
        # peft calls a transformers method that transformers 5 deprecates; nothing for a user to do.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        device = next(encoder.parameters()).device
        # get_peft_model freezes every weight that is not the adapter's; .to() puts the new adapter
        # weights (the prefix embedding, say) on the model's device, wherever peft created them.
        return get_peft_model(encoder, config).to(device).eval()


def _build_mezo_lora(clf, setup, hp):
    from peft import LoraConfig
    config = LoraConfig(r=hp["r"], lora_alpha=hp["alpha"], lora_dropout=0.0,
                        target_modules=lora_target_modules(clf.encoder))
    clf.encoder = _wrap_peft(clf.encoder, config)
    return clf, _mezo_trainer(clf, setup, hp, "mezo-lora", clf.loss), clf.accuracy


def real_token_prefix(encoder, tokenizer, text, n_tokens):
    """Per layer, the keys and values of the first ``n_tokens`` word tokens of ``text`` (repeated if
    it is shorter) in the frozen ``encoder``, laid out as peft's prefix embedding
    ``[n_tokens, n_layers * 2 * hidden]`` (layer l: key at block 2l, value at block 2l+1). None if the
    encoder's attention does not expose ``key``/``value`` Linear layers (then peft's init is kept)."""
    keys = [m for n, m in encoder.named_modules() if n.endswith(".self.key") and isinstance(m, torch.nn.Linear)]
    values = [m for n, m in encoder.named_modules() if n.endswith(".self.value") and isinstance(m, torch.nn.Linear)]
    if not keys or len(keys) != len(values):
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.unk_token_id]
    ids = (ids * n_tokens)[:n_tokens]
    ids = [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id] if tokenizer.cls_token_id is not None else ids
    start = 1 if tokenizer.cls_token_id is not None else 0
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[0, start:start + n_tokens]))
             for pair in zip(keys, values) for m in pair]
    try:
        with torch.no_grad():
            encoder(input_ids=torch.tensor([ids], device=next(encoder.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(captured, dim=1)  # hooks fire key, value per layer, in layer order


def _build_mezo_prefix(clf, setup, hp):
    from peft import PrefixTuningConfig, TaskType
    if setup.kind == "causal":
        from .causal_lm import real_token_prefix as causal_prefix
        init = causal_prefix(clf.encoder, clf.tokenizer, hp["prefix_init"], hp["tokens"])
        clf.position_offset = hp["tokens"]  # the prompt's positions follow the prefix's
    else:
        init = real_token_prefix(clf.encoder, clf.tokenizer, hp["prefix_init"], hp["tokens"])
    config = PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=hp["tokens"])
    clf.encoder = _wrap_peft(clf.encoder, config)
    embedding = clf.encoder.prompt_encoder["default"].embedding
    if init is not None and init.shape == embedding.weight.shape:
        with torch.no_grad():
            embedding.weight.copy_(init)
    else:
        warnings.warn("mezo-prefix: could not read real-token keys/values from this model; the prefix "
                      "keeps peft's random initialization", RuntimeWarning, stacklevel=2)
    train = _mezo_trainer(clf, setup, hp, "mezo-prefix", clf.loss)

    def quiet(fn):
        def wrapped(*args):
            # peft hands the prefix to BERT as past_key_values, which transformers 5 deprecates
            # (a FutureWarning on every forward); it still works, as the tests check.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
                return fn(*args)
        return wrapped
    return clf, quiet(train), quiet(clf.accuracy)


def _build_ft_adam(clf, setup, hp):
    select_trainable(clf.encoder, "all")
    sampler = batches(setup.splits["train"], setup.batch_size, setup.seed)

    def train():
        opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=hp["lr"],
                               weight_decay=setup.weight_decay)

        def step(_):
            opt.zero_grad(set_to_none=True)
            loss = clf.loss(*next(sampler))
            loss.backward()
            opt.step()
            return loss.item()
        return _loop(hp["steps"], "ft-adam", setup, step)
    return clf, train, clf.accuracy


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
