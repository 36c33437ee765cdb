"""Word polarity: is an English word positive or negative? Built at run time from VADER's lexicon.

Source: ``vader_lexicon.txt`` shipped by the ``vaderSentiment`` package (Hutto & Gilbert, 2014):
about 7,500 tokens, each rated by 10 people on a -4 (extremely negative) .. +4 (extremely
positive) scale. Each line is ``token <TAB> mean <TAB> std <TAB> [10 ratings]``. Where the package
is not installed (a GPU machine without network, say), the same file can be given by path:
``path=`` / ``--lexicon FILE``, or the environment variable ``FASTMEZO_VADER_LEXICON`` (a copy of
the file, e.g. a copy of vaderSentiment's vader_lexicon.txt); the task is then identical.

Construction (deterministic; no download):
  1. Parse every line into (token, mean rating, standard deviation of the ratings).
  2. Keep only words: tokens that are ASCII letters only (drops emoticons such as ``:-)``, and
     tokens with digits or punctuation). A few slang words appear twice (``lol``, ``ok``, ...):
     the first line wins.
  3. Keep entries with ``|mean| >= threshold`` (default 1.0, i.e. clearly polar); label 1
     ("positive") if mean > 0, else 0 ("negative").
  4. Optionally drop entries whose raters disagree: ``std > max_std`` (off by default).
  5. Balance the classes: each class is sorted by word, shuffled with ``random.Random(seed)``,
     and cut to the size of the smaller class (the lexicon has more negative words).
  6. Split each class by ``fractions`` (default 60/20/20) into train/dev/test, so every split is
     balanced and the splits are disjoint; each split is then shuffled (classes interleaved) by a
     generator seeded from ``seed`` and the split's name.
  7. ``k``-shot (as in MeZO's k=16 / k=512 settings): train keeps only the first k words of each
     class's train part. Dev and test are unchanged by k.

Examples are ``(word, label)`` pairs; :data:`LABELS` names the labels.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

LABELS = ("negative", "positive")


@dataclass(frozen=True)
class Entry:
    """One lexicon line: the token, the mean of its 10 ratings and their standard deviation."""
    word: str
    mean: float
    std: float


#: Environment variable naming a vader_lexicon.txt to use instead of the installed package's.
LEXICON_ENV = "FASTMEZO_VADER_LEXICON"


def lexicon_path(path=None) -> Path:
    """The lexicon file: ``path`` if given, else $FASTMEZO_VADER_LEXICON if set, else
    vader_lexicon.txt inside the installed vaderSentiment package.

    Raises FileNotFoundError, saying where it looked and how to fix it, if the file is missing or
    neither a path nor the package is available.
    """
    if path is not None and str(path) != "":
        where = f"lexicon file {path}"
    elif os.environ.get(LEXICON_ENV):
        path, where = os.environ[LEXICON_ENV], f"{LEXICON_ENV}={os.environ[LEXICON_ENV]}"
    else:
        try:
            import vaderSentiment
        except ImportError:
            raise FileNotFoundError(
                "the vader_polarity task needs VADER's lexicon: pip install vaderSentiment, or give a copy "
                f"of vader_lexicon.txt with --lexicon FILE or the environment variable {LEXICON_ENV}") from None
        path = Path(vaderSentiment.__file__).resolve().parent / "vader_lexicon.txt"
        where = f"vader_lexicon.txt of the vaderSentiment package ({path})"
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vader_polarity: {where}: no such file (expected VADER's vader_lexicon.txt)")
    return path


def read_lexicon(path=None) -> list[Entry]:
    """Every line of the lexicon as an :class:`Entry` (steps 1 of the construction), in file order.

    ``path``: the file (default: :func:`lexicon_path`'s choice). Raises ValueError if the file holds
    no lexicon line (not VADER's lexicon)."""
    path = lexicon_path(path)
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                continue
            try:
                entries.append(Entry(fields[0], float(fields[1]), float(fields[2])))
            except ValueError:
                continue
    if not entries:
        raise ValueError(f"vader_polarity: {path} has no 'token<TAB>mean<TAB>std' line; is it VADER's "
                         "vader_lexicon.txt?")
    return entries


def polar_words(entries, threshold: float = 1.0, max_std: float | None = None) -> list[Entry]:
    """Steps 2-4: alphabetic words only, first occurrence of each, |mean| >= threshold, std <= max_std."""
    seen, kept = set(), []
    for e in entries:
        if not (e.word.isascii() and e.word.isalpha()) or e.word in seen:
            continue
        seen.add(e.word)
        if abs(e.mean) < threshold or e.mean == 0:
            continue
        if max_std is not None and e.std > max_std:
            continue
        kept.append(e)
    return kept


def build(threshold: float = 1.0, max_std: float | None = None, seed: int = 0,
          fractions=(0.6, 0.2, 0.2), k: int | None = None, path=None, verbose: bool = True):
    """The task as ``{"train": [...], "dev": [...], "test": [...]}`` of ``(word, label)`` pairs.

    ``k`` (examples per class) shrinks train to a k-shot set; None keeps the full train split.
    ``path``: the lexicon file (default: $FASTMEZO_VADER_LEXICON, else the vaderSentiment package's).
    Raises ValueError if k exceeds the train words available per class.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    words = polar_words(read_lexicon(path), threshold, max_std)
    classes = [sorted(e.word for e in words if e.mean < 0), sorted(e.word for e in words if e.mean > 0)]
    per_class = min(len(c) for c in classes)
    n_train = int(per_class * fractions[0])
    n_dev = int(per_class * fractions[1])
    if k is not None and not 0 < k <= n_train:
        raise ValueError(f"k={k} examples per class, but the train split has {n_train} per class")
    rng = random.Random(seed)
    splits = {"train": [], "dev": [], "test": []}
    for label, names in enumerate(classes):
        names = list(names)
        rng.shuffle(names)
        names = names[:per_class]
        train = names[:n_train]
        splits["train"] += [(w, label) for w in (train[:k] if k is not None else train)]
        splits["dev"] += [(w, label) for w in names[n_train:n_train + n_dev]]
        splits["test"] += [(w, label) for w in names[n_train + n_dev:]]
    for name in splits:
        # Interleave the classes so that any prefix of a split is mixed. One generator per split,
        # seeded by a string (deterministic across processes), so that k does not change the
        # order of dev and test.
        random.Random(f"vader_polarity/{seed}/{name}").shuffle(splits[name])
    if verbose:
        print(f"vader_polarity: {len(words)} polar words (|mean| >= {threshold}"
              f"{'' if max_std is None else f', std <= {max_std}'}): "
              f"{len(classes[1])} positive, {len(classes[0])} negative; balanced to {per_class} per class; "
              + ", ".join(f"{n} {len(v)}" for n, v in splits.items())
              + ("" if k is None else f" (train is {k}-shot)"))
    return splits
