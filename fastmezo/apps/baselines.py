"""The baselines of the comparison, the methods that are not MeZO: zero-shot (the prompt as it is),
in-context learning (demonstrations in a causal LM's prompt), linear probing (a logistic-regression
head on frozen features) and fine-tuning by backpropagation with Adam (all weights).

Each builder takes (classifier, setup, hyper-parameters) and returns (module, train, accuracy): the
module whose parameters are reported (trainable = requires_grad), train() -> list of losses,
accuracy(examples) -> float; :func:`fastmezo.apps.runner.run_method` calls them. Apart from the MeZO
methods (:mod:`fastmezo.apps.mezo_methods`): these need neither fastmezo's optimizer nor peft.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .prompt_model import select_trainable
from .training import _loop, batches


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
