"""MeZO on a non-differentiable objective: token F1 of greedily generated answers (issue 6, item 5).

The MeZO paper (Malladi et al., 2023, section "Non-differentiable objectives") fine-tunes OPT on SQuAD
by maximizing the F1 of the *generated* answer directly: greedy decoding (an argmax per token) has no
gradient, but MeZO only needs the objective's value at theta + eps*z and theta - eps*z. This example
does the same thing at toy scale, on CPU, with nothing downloaded:

* model: a tiny randomly initialised ``OPTForCausalLM`` built from ``transformers.OPTConfig``
  (2 layers, width 64, ~0.1M weights; see :func:`build_model`);
* task: a synthetic extractive-QA set built at run time (:func:`build_kv_qa`). A context states a few
  facts "the <key> is <adjective> <noun> ." and the question asks for one key's value; the gold answer
  is the two-word span of the context. Every prompt has the same number of tokens, so batches need
  no padding;
* tokenizer: a word-level vocabulary over the task's closed word list (:class:`WordVocab`);
* objective: ``-mean F1`` over a batch, with the SQuAD-style token F1 (:func:`squad_f1`) between the
  greedily decoded answer (:func:`greedy_generate`, a hand-written loop under ``torch.no_grad``) and the
  gold answer.

Set-up, not part of MeZO: a random-init model knows nothing, and a few hundred zeroth-order steps will
not teach a 0.1M-weight transformer to read from scratch (MeZO, like the paper says, fine-tunes a model
that already has the skill roughly). So the model is first *warmed up* with a few Adam steps of
teacher-forced cross-entropy on the answer tokens (:func:`warm_up`), stopped early on purpose so that
it answers partly right. Then the gradients and Adam are thrown away and MeZO maximizes F1 with
forward passes only. The script reports the dev F1 after warm-up (MeZO's starting point) and after
MeZO, on a fixed dev set drawn from the same distribution as train with another seed.

MeZO settings (defaults): all 107k weights, lr 3e-4, batch 64, eps 1e-2. eps is 10x the paper's
full-parameter value on purpose: greedy F1 is piecewise constant in the weights, and with eps 1e-3 a
perturbation rarely flips any argmax, so l+ == l-, g = 0 and the step does nothing (the run reports
how many steps had l+ != l-). Larger lr (1e-3 and up) made dev F1 fall in trial runs.

    python examples/generation_f1.py --steps 1000 --seed 0 --out curve.json

Measured on a 2-core CPU (bench/results/2026-11-29-cpu-generation-f1/, ``--threads 1``): dev F1
0.298 -> 0.385 (seed 0) and 0.205 -> 0.246 (seed 1) in 1000 MeZO steps, about 77 s of CPU each, after
11 s of warm-up. Dev F1 moves by 0.02-0.03 between checkpoints, so treat one seed's gain with care.

Reusable pieces: :func:`normalize_answer`, :func:`squad_f1`, :class:`WordVocab`, :class:`QAExample`,
:func:`build_kv_qa`, :func:`build_model`, :func:`encode_prompts`, :func:`greedy_generate`,
:func:`batch_f1`, :func:`warm_up`, :func:`run_mezo`.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

# ----------------------------------------------------------------------------------------------
# SQuAD-style token F1
# ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, drop punctuation, drop the articles a/an/the,
    collapse whitespace (the order of the official script's ``normalize_answer``)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold) -> float:
    """Token-level F1 between a predicted answer and the gold answer(s), as in SQuAD.

    Both strings are normalized (:func:`normalize_answer`) and split on whitespace; the overlap counts
    tokens with multiplicity (a bag intersection). precision = overlap / len(prediction tokens),
    recall = overlap / len(gold tokens), F1 = 2 P R / (P + R), 0 when nothing overlaps.

    Empty answers follow the SQuAD 2.0 script (and the MeZO repository's metric): if either side is
    empty after normalization, F1 is 1.0 when both are empty and 0.0 otherwise.

    ``gold`` is one string or a list of acceptable answers; the best F1 over them is returned (SQuAD
    scores a prediction against every annotator's answer and keeps the maximum).
    """
    if not isinstance(gold, str):
        golds = list(gold)
        if not golds:
            raise ValueError("squad_f1 needs at least one gold answer")
        return max(squad_f1(prediction, g) for g in golds)
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------
# the synthetic extractive-QA task and its word-level vocabulary
# ----------------------------------------------------------------------------------------------

KEYS = ("cup", "pen", "map", "box", "hat", "key", "bag", "lamp", "book", "coin", "ring", "sock")
ADJECTIVES = ("red", "blue", "green", "tall", "small", "old", "new", "dark")
NOUNS = ("fox", "owl", "cat", "dog", "bee", "cow", "elk", "yak")
TEMPLATE_WORDS = ("the", "is", ".", "question", ":", "what", "?", "answer")
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class WordVocab:
    """A closed word-level vocabulary: whitespace tokens <-> ids; ``<pad>``=0, ``<bos>``=1, ``<eos>``=2.

    The task's texts are lower-case words separated by single spaces (punctuation is its own word),
    so splitting on whitespace is the whole tokenizer. Unknown words raise: the task never makes one.
    """

    def __init__(self, words):
        self.itos = [PAD, BOS, EOS] + sorted(set(words) - {PAD, BOS, EOS})
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Ids of the whitespace-separated words of ``text`` (no special tokens added)."""
        try:
            return [self.stoi[w] for w in text.split()]
        except KeyError as exc:
            raise ValueError(f"word {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """Text of ``ids``: words joined by spaces, stopping at the first ``<eos>``, specials dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                words.append(self.itos[i])
        return " ".join(words)


def task_vocab() -> WordVocab:
    """The vocabulary of :func:`build_kv_qa` with its default word lists (39 ids)."""
    return WordVocab(KEYS + ADJECTIVES + NOUNS + TEMPLATE_WORDS)


@dataclass(frozen=True)
class QAExample:
    """One extractive-QA example. ``prompt`` = context + question + "answer :", what the model sees;
    ``answer`` is a span of ``context`` (SQuAD-style extractive)."""
    context: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return f"{self.context} {self.question} answer :"


def build_kv_qa(n: int, *, n_facts: int = 3, seed: int = 0, keys=KEYS, adjectives=ADJECTIVES,
                nouns=NOUNS) -> list[QAExample]:
    """``n`` synthetic key/value QA examples, deterministic in ``seed``.

    Construction of one example (all draws from ``random.Random(seed)``, in this order):
      1. ``n_facts`` distinct keys, sampled without replacement from ``keys``;
      2. for each key a value "<adjective> <noun>", the values distinct within the example;
      3. context: "the <k1> is <v1> . the <k2> is <v2> . ..." in the sampled order;
      4. one of the facts, uniformly: question "question : what is the <k> ?", answer "<v>".
    The answer is the value span of its fact, so it always occurs in the context; the two words
    give F1 partial credit (0.5 per word right). Every prompt has 6 * n_facts + 9 words, so a batch
    of prompts is a rectangle. Train and dev sets come from different seeds of the same distribution
    (12 keys x 64 values: the sets overlap in single facts, not in whole examples, in practice).
    """
    if not 1 <= n_facts <= len(keys):
        raise ValueError(f"n_facts must be in 1..{len(keys)}, got {n_facts}")
    if n_facts > len(adjectives) * len(nouns):
        raise ValueError("fewer distinct values than facts")
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        ks = rng.sample(list(keys), n_facts)
        values: list[str] = []
        while len(values) < n_facts:
            v = f"{rng.choice(adjectives)} {rng.choice(nouns)}"
            if v not in values:
                values.append(v)
        context = " ".join(f"the {k} is {v} ." for k, v in zip(ks, values))
        j = rng.randrange(n_facts)
        examples.append(QAExample(context, f"question : what is the {ks[j]} ?", values[j]))
    return examples


def encode_prompts(vocab: WordVocab, examples) -> torch.Tensor:
    """[batch, length] int64 ids of ``<bos> prompt`` for each example (all prompts are the same length)."""
    rows = [[vocab.bos_id] + vocab.encode(e.prompt) for e in examples]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("prompts of different lengths; this example decodes without padding")
    return torch.tensor(rows, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# the model, greedy decoding and the F1 objective
# ----------------------------------------------------------------------------------------------

def build_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 256,
                max_positions: int = 64, seed: int = 0):
    """A tiny randomly initialised OPT causal LM (no download), in eval mode, float32.

    Initialisation draws from torch's global RNG (transformers' ``_init_weights``), so it runs inside
    ``torch.random.fork_rng`` with ``torch.manual_seed(seed)``: same seed, same weights, and the
    caller's RNG state is left as it was. Dropout is 0 (MeZO's forwards run in eval mode anyway).
    The output embedding is tied to the input embedding, as in OPT.
    """
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=max_positions,
                       word_embed_proj_dim=hidden, dropout=0.0, attention_dropout=0.0,
                       activation_dropout=0.0, layerdrop=0.0, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
    return model.float().eval()


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding, hand-written: ``max_new_tokens`` times, run the model on the whole sequence
    and append the argmax of the last position's logits. Each row's output is cut before its first
    ``eos_id``. Without a KV cache: the sequences are ~25 tokens, so recomputing is cheap and the
    loop stays obviously equal to "argmax, append" (ties go to the lowest id, torch.argmax's rule)."""
    seq = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=seq, use_cache=False).logits[:, -1, :]
        seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
    out = []
    for row in seq[:, input_ids.shape[1]:].tolist():
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def batch_f1(model, vocab: WordVocab, examples, max_new_tokens: int = 3) -> float:
    """Mean :func:`squad_f1` of the greedy answers to ``examples`` (a Python float; no autograd).

    ``max_new_tokens`` = 3 leaves room for the two answer words and ``<eos>``; a model that does not
    stop gets its third word counted against its precision, as SQuAD would."""
    ids = greedy_generate(model, encode_prompts(vocab, examples), max_new_tokens, vocab.eos_id)
    scores = [squad_f1(vocab.decode(p), e.answer) for p, e in zip(ids, examples)]
    return sum(scores) / len(scores)


def warm_up(model, vocab: WordVocab, examples, *, steps: int, lr: float = 3e-3, batch: int = 32,
            seed: int = 0) -> list[float]:
    """Set-up, not MeZO: ``steps`` Adam steps of teacher-forced cross-entropy on the answer tokens
    (the two answer words and ``<eos>``; prompt positions are masked out with -100), batches drawn
    from ``examples`` with ``random.Random(seed)``. Afterwards every ``.grad`` is set back to None and
    the model is in eval mode, so the MeZO phase starts with no gradient memory. Returns the losses."""
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        chosen = [examples[rng.randrange(len(examples))] for _ in range(batch)]
        prompt = encode_prompts(vocab, chosen)
        answer = torch.tensor([vocab.encode(e.answer) + [vocab.eos_id] for e in chosen])
        input_ids = torch.cat([prompt, answer], dim=1)
        labels = input_ids.clone()
        labels[:, :prompt.shape[1]] = -100
        loss = model(input_ids=input_ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.zero_grad(set_to_none=True)
    del opt
    model.eval()
    return losses


def trainable_parameters(model, trainable: str = "all") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) pairs MeZO perturbs: "all" (108k weights at the default size) or "bitfit"
    (biases and LayerNorm weights only, 1.8k: the zeroth-order estimate's variance grows with the
    number of perturbed weights, which is why the paper tuned a prefix for its SQuAD F1 run). In short
    trial runs here "bitfit" was not better than "all", so "all" is the default."""
    if trainable == "all":
        return list(model.named_parameters())
    if trainable == "bitfit":
        return [(n, p) for n, p in model.named_parameters() if n.endswith("bias") or "layer_norm" in n]
    raise ValueError(f"trainable must be 'all' or 'bitfit', got {trainable!r}")


def run_mezo(model, vocab: WordVocab, train, dev, *, steps: int, lr: float, eps: float, batch: int,
             seed: int, eval_every: int, trainable: str = "all", max_new_tokens: int = 3, log=print) -> dict:
    """MeZO on ``-batch_f1`` over random train batches (no weight decay), perturbing the parameters
    chosen by :func:`trainable_parameters`.

    Each step draws ``batch`` train examples with ``random.Random(seed)`` and calls ``opt.step`` with a
    closure returning ``-F1`` of that batch; both of the step's closure calls see the same batch, as
    MeZO requires. The dev F1 (fixed ``dev`` set) is measured at step 0 and every ``eval_every`` steps.
    Returns the curve: {"step", "dev_f1", "train_f1"} rows, where train_f1 is the mean of the two
    perturbed batch F1s over the steps since the previous row.
    """
    import fastmezo

    # float32 weights: stochastic rounding (for fp16/bf16) has nothing to round here; off, every pass
    # also stays on the fused native kernel.
    opt = fastmezo.MeZO(trainable_parameters(model, trainable), lr=lr, eps=eps, seed=seed,
                        stochastic_rounding=False)
    rng = random.Random(seed + 1)

    def dev_f1() -> float:
        with torch.no_grad():  # evaluation needs no autograd either
            return batch_f1(model, vocab, dev, max_new_tokens)

    curve = [dict(step=0, dev_f1=dev_f1(), train_f1=None)]
    log(f"step {0:5d}  dev F1 {curve[0]['dev_f1']:.4f}")
    window: list[float] = []
    moved = 0  # steps whose two F1s differed: a flat objective gives g = 0 and no update
    for t in range(1, steps + 1):
        chosen = [train[rng.randrange(len(train))] for _ in range(batch)]
        # Both calls of this step's closure score the same batch (bound here, not looked up later).
        opt.step(lambda batch=chosen: -batch_f1(model, vocab, batch, max_new_tokens))
        window.append(-(opt.loss_plus + opt.loss_minus) / 2)
        moved += opt.projected_grad != 0
        if t % eval_every == 0 or t == steps:
            row = dict(step=t, dev_f1=dev_f1(),
                       train_f1=sum(window) / len(window))
            curve.append(row)
            window = []
            log(f"step {t:5d}  dev F1 {row['dev_f1']:.4f}  train F1 (perturbed, avg) {row['train_f1']:.4f}")
    return dict(curve=curve, skipped_steps=opt.skipped_steps, nonzero_steps=moved)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1000, help="MeZO steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data, warm-up and MeZO")
    p.add_argument("--out", default=None, help="write the curve and settings as JSON here")
    p.add_argument("--warmup-steps", type=int, default=100, help="Adam steps of set-up (0: none)")
    p.add_argument("--warmup-lr", type=float, default=3e-3)
    p.add_argument("--lr", type=float, default=3e-4, help="MeZO learning rate")
    p.add_argument("--eps", type=float, default=1e-2,
                   help="MeZO perturbation scale (large enough to flip greedy tokens)")
    p.add_argument("--batch", type=int, default=64, help="examples per MeZO step")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-dev", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--trainable", choices=("all", "bitfit"), default="all", help="weights MeZO perturbs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    vocab = task_vocab()
    train = build_kv_qa(args.n_train, seed=2 * args.seed)
    dev = build_kv_qa(args.n_dev, seed=2 * args.seed + 1)
    model = build_model(len(vocab), seed=args.seed)
    f1_init = batch_f1(model, vocab, dev)
    t0 = time.perf_counter()
    losses = warm_up(model, vocab, train, steps=args.warmup_steps, lr=args.warmup_lr, seed=args.seed)
    warm_s = time.perf_counter() - t0
    print(f"random init: dev F1 {f1_init:.4f}; after {args.warmup_steps} Adam warm-up steps "
          f"({warm_s:.1f} s, last loss {losses[-1] if losses else float('nan'):.3f}):")
    t0, c0 = time.perf_counter(), time.process_time()
    result = run_mezo(model, vocab, train, dev, steps=args.steps, lr=args.lr, eps=args.eps,
                      batch=args.batch, seed=args.seed, eval_every=args.eval_every, trainable=args.trainable)
    mezo_s, mezo_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    before, after = result["curve"][0]["dev_f1"], result["curve"][-1]["dev_f1"]
    grads = sum(p.grad is not None for p in model.parameters())
    print(f"MeZO on -F1: dev F1 {before:.4f} -> {after:.4f} ({after - before:+.4f}) in {args.steps} steps, "
          f"{mezo_s:.1f} s wall ({mezo_cpu_s:.1f} s CPU); {result['nonzero_steps']} steps had l+ != l-; "
          f"parameters holding a .grad: {grads}")
    report = dict(
        settings=vars(args), n_params=sum(p.numel() for p in model.parameters()), vocab_size=len(vocab),
        dev_f1_random_init=f1_init, warmup_losses=losses, warmup_seconds=warm_s,
        dev_f1_before_mezo=before, dev_f1_after_mezo=after, mezo_seconds=mezo_s, mezo_cpu_seconds=mezo_cpu_s,
        curve=result["curve"], skipped_steps=result["skipped_steps"], nonzero_steps=result["nonzero_steps"],
        torch_threads=torch.get_num_threads(),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=__import__("transformers").__version__),
        command=" ".join(["python", "examples/generation_f1.py"] + (sys.argv[1:] if argv is None else list(argv))),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
