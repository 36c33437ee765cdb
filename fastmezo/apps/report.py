"""Outputs of the fine-tuning comparison: a markdown table, a CSV, the JSON record and a PNG plot.

Every file is written atomically (:func:`write_atomic`: a temporary file in the same folder, then
``os.replace``), so a reader, or a run stopped halfway, sees either the old file or the new one.
The table and the CSV hold the methods done (``results["methods"]``); the notes say which are not.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

CSV_COLUMNS = ("method", "title", "trainable_params", "total_params", "steps", "best_step", "test_acc", "dev_acc",
               "train_seconds", "seconds_per_step", "eval_seconds", "peak_mib", "extra_mib", "memory_kind")


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path, write):
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it to ``path``. On
    any failure (an interrupt included) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text):
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def memory_header(results):
    """What the memory columns measure, in words, for the table's notes."""
    kinds = {r["memory_kind"] for r in results["methods"]}
    if not kinds:
        return "no method done yet"
    kind = kinds.pop() if len(kinds) == 1 else " / ".join(sorted(kinds))
    if kind.startswith("CUDA"):
        return ("peak = torch.cuda.max_memory_allocated during training (weights included); extra = peak "
                "minus the memory allocated when training started (the loaded model)")
    return (f"peak = {kind}, during training (Python, torch and the model included; each method in a fresh "
            "forked process); extra = peak minus the RSS when training started (the loaded model): "
            "what training itself adds (activations, gradients, optimizer state)")


def _steps(r):
    """Steps trained, with the step of the selected checkpoint when it is not the last."""
    best = r.get("best_step")
    return f"{r['steps']} ({best})" if best and best != r["steps"] else f"{r['steps']}"


def markdown(results):
    """The comparison as a markdown table, with the setting above it and notes below."""
    c = results["config"]
    lines = [
        f"# Fine-tuning comparison: {results['task']}", "",
        f"model {results['model']}; device {c['device']} (MeZO backend {results['backend']}); "
        f"train {results['n_train']} examples (k={c['k'] or 'all'} per class), dev {results['n_dev_eval']}"
        f" of {results['n_dev']}, test {results['n_test']}; batch {c['batch_size']}; seed {c['seed']}; "
        f"setting {'quick' if c['quick'] else 'full'}.", "",
        f"Command: `{results['command']}`", "",
        *status_lines(results),
        "| method | trained weights | steps | test acc. | dev acc. | train time (s) | s/step | "
        "peak memory (MiB) | extra over loaded model (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["methods"]:
        lines.append(
            f"| {r['title']} | {r['trainable_params']:,} | {_steps(r)} | **{_fmt(r['test_acc'], '.4f')}** | "
            f"{_fmt(r['dev_acc'], '.4f')} | {_fmt(r['train_seconds'], '.1f')} | {_fmt(r['seconds_per_step'], '.3f')} | "
            f"{_fmt(r['peak_mib'], '.0f')} | {_fmt(r['extra_mib'], '.0f')} |")
    lines += ["", "Notes:", f"- memory: {memory_header(results)}. Memory depends on the environment (torch "
              "build and version, allocator, threads, libraries loaded, device): compare the rows of one table, "
              "not numbers from different machines.",
              "- zero-shot trains nothing: its time and memory are those of one forward pass of a training batch "
              "(inference); linear probing's include extracting the frozen features of the train set.",
              "- hyper-parameters per method (lr, eps, steps, ...) are in results.json under `methods[].hparams`.",
              *([f"- checkpoint selection (the paper's protocol): dev accuracy every {c['eval_every']} steps and "
                 "after the last; the best weights are the ones evaluated, 'steps' reads 'last (best)' where "
                 "the best came earlier; dev curves in results.json under `methods[].dev_curve`."]
                if c.get("eval_every") else ["- no checkpoint selection: the weights of the last step are evaluated."]),
              f"- whole run: {results['wall_seconds']:.0f} s of wall time"
              + (f" over {len(results['commands'])} invocations (--resume)." if len(results.get("commands", [])) > 1
                 else ".")]
    return "\n".join(lines) + "\n"


def status_lines(results):
    """A line saying which methods are not done, when the run is not complete (else none)."""
    status = results.get("status") or {}
    if results.get("state", "done") == "done" and all(v == "done" for v in status.values()):
        return []
    by_status = {}
    for name, value in status.items():
        by_status.setdefault(value, []).append(name)
    parts = [f"{value}: {', '.join(names)}" for value, names in by_status.items() if value != "done"]
    state = results.get("state", "running")
    if state == "running":
        state = "running (or stopped without a chance to say so)"
    return [f"**Incomplete run, {state}**; methods " + "; ".join(parts) + ". The table holds the methods done.", ""]


def csv_text(results):
    """One row per method done, the columns of :data:`CSV_COLUMNS`."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in results["methods"]:
        writer.writerow({k: r.get(k) for k in CSV_COLUMNS})
    return buffer.getvalue()


def plot(results, path):
    """Test accuracy, peak memory, training time per method, and the training losses, as a PNG written
    to ``path`` (a file name or a binary file)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["methods"]
    names = [r["method"] for r in rows]
    y = list(range(len(rows)))[::-1]
    colors = ["0.6" if r["method"] == "zero-shot" else "C2" if r["method"] in ("linear-probe", "ft-adam")
              else "C0" for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    ax = axes[0, 0]
    ax.barh(y, [r["test_acc"] for r in rows], color=colors)
    for yi, r in zip(y, rows):
        ax.text(r["test_acc"] + 0.005, yi, f"{r['test_acc']:.3f}", va="center", fontsize=8)
    zero = next((r["test_acc"] for r in rows if r["method"] == "zero-shot"), None)
    if zero is not None:
        ax.axvline(zero, color="0.4", ls=":", lw=1)
    lo = min(r["test_acc"] for r in rows)
    ax.set(xlim=(max(0.0, lo - 0.1), 1.0), yticks=y, yticklabels=names, xlabel="test accuracy",
           title="test accuracy")

    ax = axes[0, 1]
    base = [r["peak_mib"] - r["extra_mib"] for r in rows]
    ax.barh(y, base, color="0.85", label="at start of training (loaded model)")
    ax.barh(y, [r["extra_mib"] for r in rows], left=base, color=colors, label="added by training")
    for yi, r in zip(y, rows):
        ax.text(r["peak_mib"], yi, f" {r['peak_mib']:.0f} (+{r['extra_mib']:.0f})", va="center", fontsize=8)
    ax.set(yticks=y, yticklabels=names, xlabel="MiB", title="peak memory during training")
    ax.set_xlim(0, max(r["peak_mib"] for r in rows) * 1.6)  # room for the labels and the legend
    ax.legend(fontsize=7, loc="upper right")

    ax = axes[1, 0]
    times = [max(r["train_seconds"], 1e-3) for r in rows]
    ax.barh(y, times, color=colors)
    for yi, t, r in zip(y, times, rows):
        ax.text(t, yi, f" {t:.1f} s ({r['steps']} steps)", va="center", fontsize=8)
    ax.set(yticks=y, yticklabels=names, xlabel="seconds", title="training time (wall)")
    ax.set_xlim(0, max(times) * 1.35)

    ax = axes[1, 1]
    for r in rows:
        losses = r.get("losses") or []
        if len(losses) < 2:
            continue
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["method"])
    ax.set(xlabel="step", ylabel="train loss (running mean)", title="training loss (0-1 loss for mezo-nondiff)")
    if ax.lines:
        ax.legend(fontsize=7)
    c = results["config"]
    fig.suptitle(f"{results['task']}, {results['model']}, k={c['k'] or 'all'}, device {c['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def output_paths(out):
    out = Path(out)
    return dict(json=out / "results.json", csv=out / "results.csv", md=out / "results.md",
                png=out / "comparison.png")


def write_tables(results, out):
    """results.json (the record), results.csv and results.md in ``out``, each atomically."""
    paths = output_paths(out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths["json"], json.dumps(results, indent=1))
    write_text_atomic(paths["csv"], csv_text(results))
    write_text_atomic(paths["md"], markdown(results))
    return paths


def write_plot(results, out):
    """comparison.png in ``out`` (atomically) from the methods done; None if there are none."""
    if not results["methods"]:
        return None
    path = output_paths(out)["png"]
    write_atomic(path, lambda f: plot(results, f))
    return path


def write_all(results, out):
    """results.json, results.csv, results.md and comparison.png in ``out``; returns their paths."""
    paths = write_tables(results, out)
    write_plot(results, out)
    return paths
