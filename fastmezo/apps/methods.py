"""The methods that the fine-tuning job compares (the MeZO paper's comparison, on one task): their
table (name, title, whether MeZO trains them, default hyper-parameters) and the parsing of --methods.

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

This module is the table alone, so that the command line, the settings and the report read the
methods' names and defaults without loading the training code. How each method is built and trained
lives in :mod:`fastmezo.apps.baselines` (zero-shot, in-context learning, linear probing, Adam) and
:mod:`fastmezo.apps.mezo_methods` (the MeZO variants); :func:`fastmezo.apps.runner.run_method` runs
one of them from fresh weights to its metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
