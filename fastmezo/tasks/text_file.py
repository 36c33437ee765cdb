"""A classification task from the user's own file (``fastmezo finetune --data path.csv|path.jsonl``).

Format: a CSV file with a header row, or JSON lines (one object per line), with the columns
``text`` and ``label`` (names configurable). An optional ``split`` column (train / dev / test;
"validation" and "val" mean dev) fixes the split; without it the rows are split per class
(stratified), 60/20/20 by default, after a shuffle by ``random.Random(seed)``, so every split has
every label in about the same proportion. Labels may be integers (0, 1, ...) or strings; their order
(numeric for integers, alphabetical for strings) gives the class indices. ``k`` (k-shot) keeps the
first k train rows of each class, as in :mod:`fastmezo.tasks.vader_polarity`.

Returns the same ``{"train", "dev", "test"}`` lists of ``(text, class index)`` pairs as the word
polarity task, plus the label names.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "val": "dev", "valid": "dev",
                 "test": "test"}


def read_rows(path, text_column="text", label_column="label"):
    """The rows of a CSV or JSON-lines file as dicts; raises a clear error for a missing file, an
    unknown extension, malformed lines or missing columns."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        columns = set(rows[0]) if rows else set()
    elif suffix in (".jsonl", ".json"):
        rows = []
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--data {path}, line {n}: not a JSON object ({exc.msg}); the file "
                                     "must hold one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"--data {path}, line {n}: expected a JSON object, got "
                                     f"{type(row).__name__}")
                rows.append(row)
        columns = set().union(*rows) if rows else set()
    else:
        raise ValueError(f"--data {path}: unknown file type {suffix or '(none)'!r}; use .csv, .tsv or .jsonl")
    if not rows:
        raise ValueError(f"--data {path}: the file has no rows")
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"--data {path}: missing column(s) {', '.join(map(repr, missing))}; the file has "
                         f"{', '.join(map(repr, sorted(columns)))} (needed: {text_column!r} and {label_column!r})")
    for n, row in enumerate(rows, 1):
        for c in (text_column, label_column):
            if row.get(c) is None or str(row[c]).strip() == "":
                raise ValueError(f"--data {path}: row {n} has an empty {c!r}")
    return rows


def _label_names(values):
    """Sorted label names: numerically if every label is an integer, else alphabetically."""
    names = sorted({str(v).strip() for v in values})
    try:
        return sorted(names, key=int)
    except ValueError:
        return names


def load(path, seed: int = 0, k: int | None = None, fractions=(0.6, 0.2, 0.2), text_column="text",
         label_column="label", split_column="split", verbose: bool = True):
    """The task in ``path`` as ``(splits, label_names)``; see the module docstring."""
    rows = read_rows(path, text_column, label_column)
    names = _label_names(r[label_column] for r in rows)
    if len(names) < 2:
        raise ValueError(f"--data {path}: column {label_column!r} has a single label ({names[0]!r}); "
                         "a classifier needs at least two")
    index = {n: i for i, n in enumerate(names)}
    examples = [(str(r[text_column]), index[str(r[label_column]).strip()]) for r in rows]
    splits = {"train": [], "dev": [], "test": []}
    if any(split_column in r for r in rows):
        for n, (row, ex) in enumerate(zip(rows, examples), 1):
            split = SPLIT_ALIASES.get(str(row.get(split_column, "")).strip().lower())
            if split is None:
                raise ValueError(f"--data {path}: row {n} has {split_column}={row.get(split_column)!r}; "
                                 f"expected one of {sorted(SPLIT_ALIASES)}")
            splits[split].append(ex)
        rng = random.Random(seed)
        rng.shuffle(splits["train"])  # so that k-shot does not just take the file's first rows
    else:
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
            raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
        rng = random.Random(seed)
        for label in range(len(names)):
            members = [ex for ex in examples if ex[1] == label]
            rng.shuffle(members)
            n_train = round(len(members) * fractions[0])
            n_dev = round(len(members) * fractions[1])
            splits["train"] += members[:n_train]
            splits["dev"] += members[n_train:n_train + n_dev]
            splits["test"] += members[n_train + n_dev:]
    for name in ("train", "test"):
        if not splits[name]:
            raise ValueError(f"--data {path}: the {name} split is empty ({len(rows)} rows); give more rows "
                             f"or a {split_column!r} column")
    if k is not None:
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        few = []
        for label, name in enumerate(names):
            members = [ex for ex in splits["train"] if ex[1] == label]
            if len(members) < k:
                raise ValueError(f"k={k} examples per class, but the train split has {len(members)} of "
                                 f"label {name!r} in {path}")
            few += members[:k]
        splits["train"] = few
    for name in splits:  # interleave the classes, deterministically
        random.Random(f"text_file/{seed}/{name}").shuffle(splits[name])
    if verbose:
        print(f"{Path(path).name}: {len(rows)} rows, labels {names}; "
              + ", ".join(f"{n} {len(v)}" for n, v in splits.items())
              + ("" if k is None else f" (train is {k}-shot)"))
    return splits, names
