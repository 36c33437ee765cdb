"""The MeZO methods of the comparison: MeZO on the weights chosen by --trainable (cross-entropy or the
non-differentiable 0-1 loss), on LoRA adapters and on prefix tuning (peft), all trained by
:func:`fastmezo.patch` through one trainer (:func:`_mezo_trainer`).

The builders keep the contract that :mod:`fastmezo.apps.baselines` states, for
:func:`fastmezo.apps.runner.run_method`. Apart from the baselines: these are what the comparison is
about, with the peft wrapping and the real-token prefix init that only they need.
"""
from __future__ import annotations

import os
import warnings

import torch

import fastmezo

from .prompt_model import select_trainable
from .training import _loop, batches


def _mezo_trainer(clf, setup, hp, name, objective, mode="inplace"):
    """train() for MeZO on clf's trainable (requires_grad) weights with the given objective. mode
    "paired": ``objective`` gives one loss per example, and each step runs it once on the batch
    stacked twice (its first half at theta + eps z, its second at theta - eps z)."""
    def train():
        # The run's trajectory (kilobytes): with the base weights it rebuilds every step's weights
        # (fastmezo.replay; the best checkpoint is the trajectory cut at its step).
        trajectory = None
        if setup.trajectory_dir is not None and setup.rank == 0:  # replicas: one trajectory is the run's
            trajectory = os.path.join(setup.trajectory_dir, f"trajectory-{name.split()[0]}.jsonl")
        if mode == "paired":     # the texts are no tensors: the loss function stacks the batch itself
            loss_fn = lambda model, batch: objective(list(batch[0]) * 2, list(batch[1]) * 2)  # noqa: E731
        else:
            loss_fn = lambda model, batch: objective(*batch)  # noqa: E731
        handle = fastmezo.patch(clf, lr=hp["lr"], eps=hp["eps"], weight_decay=setup.weight_decay,
                                seed=setup.seed, loss_fn=loss_fn, trajectory=trajectory, mode=mode)
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
    if setup.mezo_mode == "paired":
        return clf, _mezo_trainer(clf, setup, hp, f"mezo ({setup.trainable}, paired)", clf.row_losses,
                                  mode="paired"), clf.accuracy
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
