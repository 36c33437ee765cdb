"""examples/generation_f1.py: MeZO on the non-differentiable F1 of generated answers.

What is checked: the SQuAD token F1 against hand-computed values; the synthetic QA task's construction;
the hand-written greedy decoder against transformers' own ``generate``; one MeZO step on the -F1
objective against the hand-written MeZO update implied by its two recorded losses (weights seen by the
closure, the losses, g and the new weights, recomputed from fastmezo.oracle's z); and a short run of
the example end to end, with the objective always evaluated without autograd.

The example is a script, not part of the package: it is loaded from its file path.
"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import fastmezo
from fastmezo import oracle

from conftest import HAS_NATIVE, ulp

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

_PATH = Path(__file__).resolve().parents[1] / "examples" / "generation_f1.py"


def _load_example():
    # dataclasses resolve the module through sys.modules, so it is registered before it runs.
    spec = importlib.util.spec_from_file_location("fastmezo_example_generation_f1", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gf = _load_example()


# ----------------------------------------------------------------------------------------------
# SQuAD F1
# ----------------------------------------------------------------------------------------------

def test_normalize_answer_follows_squad():
    # lower case, punctuation removed (inside words too: SQuAD deletes the characters), articles
    # a/an/the removed as whole words only, whitespace collapsed.
    assert gf.normalize_answer("  The  Red, FOX! ") == "red fox"
    assert gf.normalize_answer("brown-fox an apple") == "brownfox apple"
    assert gf.normalize_answer("theatre anthem") == "theatre anthem"  # not articles
    assert gf.normalize_answer("a an the") == ""


@pytest.mark.parametrize("prediction,gold,expected", [
    ("red fox", "red fox", 1.0),
    ("The red fox.", "red FOX", 1.0),           # normalization makes them equal
    ("fox red", "red fox", 1.0),                # a bag of tokens: order does not matter
    ("red", "red fox", 2 / 3),                  # P = 1, R = 1/2 -> 2 * 1 * 0.5 / 1.5
    ("red fox jumps", "red fox", 0.8),          # P = 2/3, R = 1 -> (4/3) / (5/3)
    ("red red red", "red fox", 0.4),            # overlap counts multiplicity: min(3, 1) = 1; P = 1/3, R = 1/2
    ("red owl", "dark red fox", 0.4),           # P = 1/2, R = 1/3 -> (1/3) / (5/6)
    ("blue owl", "red fox", 0.0),               # no overlap
    ("", "red fox", 0.0),                       # empty prediction
    ("the", "red fox", 0.0),                    # empty after normalization
    ("red fox", "", 0.0),                       # empty gold, non-empty prediction
    ("", "", 1.0),                              # both empty (SQuAD 2.0 rule)
    ("an", "the.", 1.0),                        # both empty after normalization
])
def test_squad_f1_hand_computed(prediction, gold, expected):
    assert gf.squad_f1(prediction, gold) == pytest.approx(expected, abs=1e-12)


def test_squad_f1_takes_the_best_gold_answer():
    # 2/3 against "red fox", 1 against "red": the maximum, as SQuAD scores several annotators.
    assert gf.squad_f1("red", ["red fox", "red"]) == 1.0
    assert gf.squad_f1("red owl", ("red fox", "blue owl", "owl")) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        gf.squad_f1("red", [])


# ----------------------------------------------------------------------------------------------
# the task, the vocabulary, greedy decoding
# ----------------------------------------------------------------------------------------------

def test_kv_qa_task_is_extractive_rectangular_and_deterministic():
    examples = gf.build_kv_qa(200, n_facts=3, seed=5)
    assert examples == gf.build_kv_qa(200, n_facts=3, seed=5)
    assert examples != gf.build_kv_qa(200, n_facts=3, seed=6)
    vocab = gf.task_vocab()
    for e in examples:
        facts = [f.split() for f in e.context.split(" . ") if f]
        assert len(facts) == 3
        keys = [f[1] for f in facts]
        values = [" ".join(f[3:5]).rstrip(" .") for f in facts]
        assert len(set(keys)) == 3 and len(set(values)) == 3
        asked = e.question.split()[-2]
        assert e.question == f"question : what is the {asked} ?"
        assert e.answer == values[keys.index(asked)]            # the value of the asked key
        assert f"the {asked} is {e.answer} ." in e.context       # a span of the context
        assert len(e.prompt.split()) == 6 * 3 + 9
        assert vocab.decode(vocab.encode(e.prompt)) == e.prompt
    # Every key gets asked about (uniform draws over 200 examples).
    assert {e.question.split()[-2] for e in examples} == set(gf.KEYS)
    ids = gf.encode_prompts(vocab, examples[:7])
    assert ids.shape == (7, 1 + 27) and bool((ids[:, 0] == vocab.bos_id).all())


def test_vocab_decode_stops_at_eos_and_drops_specials():
    vocab = gf.task_vocab()
    assert len(vocab) == 3 + len(gf.KEYS) + len(gf.ADJECTIVES) + len(gf.NOUNS) + len(gf.TEMPLATE_WORDS)
    red, fox = vocab.encode("red fox")
    assert vocab.decode([vocab.bos_id, red, vocab.pad_id, fox, vocab.eos_id, red]) == "red fox"
    assert vocab.decode([vocab.eos_id, red]) == ""
    with pytest.raises(ValueError, match="zebra"):
        vocab.encode("red zebra")


@pytest.fixture(scope="module")
def warm_state():
    """A default-size example model after 40 Adam warm-up steps of 16 examples: it answers partly
    right, so F1 is neither 0 nor 1 and a perturbation can change it."""
    vocab = gf.task_vocab()
    model = gf.build_model(len(vocab), seed=0)
    gf.warm_up(model, vocab, gf.build_kv_qa(400, seed=0), steps=40, batch=16, seed=0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(state):
    model = gf.build_model(len(gf.task_vocab()), seed=0)
    model.load_state_dict(state)
    return model


def test_greedy_generate_matches_transformers_generate(warm_state):
    """The hand-written loop against transformers' greedy search (an independent implementation with
    a KV cache), cut at the first <eos>."""
    vocab = gf.task_vocab()
    model = _model(warm_state)
    ids = gf.encode_prompts(vocab, gf.build_kv_qa(32, seed=9))
    mine = gf.greedy_generate(model, ids, 3, vocab.eos_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                             do_sample=False, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id)
    theirs = [r[:r.index(vocab.eos_id)] if vocab.eos_id in r else r for r in out[:, ids.shape[1]:].tolist()]
    assert mine == theirs
    assert len({tuple(r) for r in mine}) > 1  # the model does not answer everything the same way


# ----------------------------------------------------------------------------------------------
# one MeZO step on -F1 against the hand-written update
# ----------------------------------------------------------------------------------------------

LR, EPS = 1e-3, 1e-2

# NORMAL_ATOL of conftest: a fast backend's z differs from the float64 oracle by at most this much
# per unit of |z| (docs/noise.md); the reference backend's z *is* the oracle's.
_Z_ATOL = {"oracle": 0.0, "native": 1e-5}


@pytest.mark.parametrize("backend", ["oracle"] + (["native"] if HAS_NATIVE else []))
def test_mezo_step_on_f1_is_the_hand_written_update(warm_state, backend):
    """For each step: the closure runs under no_grad at theta + eps z and then theta - eps z (z from
    fastmezo.oracle.noise, each tensor's key from its name); the recorded losses are -F1 of the batch at
    those weights (recomputed on a fresh model); g = (l+ - l-) / (2 eps); and the new weights are
    theta - lr g z. Steps repeat until one has g != 0 (F1 is piecewise constant, so some steps have
    l+ == l- and must leave the weights where they were)."""
    vocab = gf.task_vocab()
    model = _model(warm_state)
    batch = gf.build_kv_qa(16, seed=11)
    named = gf.trainable_parameters(model, "all")
    params = [p for _, p in named]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    opt = fastmezo.MeZO(named, lr=LR, eps=EPS, seed=3, stochastic_rounding=False, backend=backend)
    za = _Z_ATOL[backend]

    seen = []  # (grad enabled?, weights) at each closure call

    def closure():
        seen.append((torch.is_grad_enabled(), [p.detach().clone() for p in params]))
        return -gf.batch_f1(model, vocab, batch)

    nonzero = 0
    for t in range(6):
        theta0 = [p.detach().clone() for p in params]
        seen.clear()
        opt.step(closure)
        assert [enabled for enabled, _ in seen] == [False, False]
        zs = [oracle.noise(p.numel(), opt.last_seed, fastmezo.key_from_name(n)).view_as(p) for n, p in named]
        assert opt.last_seed == fastmezo.derive_seed(3, t)

        # The weights the closure saw: theta0 + eps z, then (theta0 + eps z) - 2 eps z, in float32
        # as written (the reference backend computes exactly these two float32 operations).
        plus = [th + EPS * z for th, z in zip(theta0, zs)]
        minus = [pl + (-2 * EPS) * z for pl, z in zip(plus, zs)]
        # Bit for bit on the reference backend; a fast backend's z moves them by up to 3 eps za |z|
        # (eps from the first pass, 2 eps from the second) plus two roundings of |theta0| + 2 eps |z|.
        for (_, w), want in zip(seen, (plus, minus)):
            for got, ref, th, z in zip(w, want, theta0, zs):
                if za == 0:
                    assert torch.equal(got, ref)
                else:
                    tol = 2 * ulp(th.abs() + 2 * EPS * z.abs()) + 3 * EPS * za * torch.clamp(z.abs(), min=1.0)
                    assert torch.all((got - ref).abs() <= tol)

        # The recorded losses are the F1 objective at the weights the closure saw, recomputed on a
        # fresh model (same architecture, those weights loaded).
        for (_, weights), recorded in zip(seen, (opt.loss_plus, opt.loss_minus)):
            probe = _model(warm_state)
            with torch.no_grad():
                for p, w in zip((p for _, p in gf.trainable_parameters(probe, "all")), weights):
                    p.copy_(w)
            assert recorded == -gf.batch_f1(probe, vocab, batch)

        g = (opt.loss_plus - opt.loss_minus) / (2 * EPS)
        assert opt.projected_grad == g

        # New weights: theta0 - lr g z (the restore is exact in real arithmetic). Three float32
        # passes each round to within 1/2 ulp of an intermediate no larger than
        # M = |theta0| + 2 eps |z| + lr |g| |z|; a fast backend's z adds (2 eps + lr |g|) * za |z|.
        for p, th, z in zip(params, theta0, zs):
            want = th.double() - LR * g * z.double()
            m = th.abs() + (2 * EPS + LR * abs(g)) * z.abs()
            tol = 3 * ulp(m).double() + (2 * EPS + LR * abs(g)) * za * torch.clamp(z.abs(), min=1.0).double()
            assert torch.all((p.detach().double() - want).abs() <= tol)
        if g != 0:
            nonzero += 1
            # Not vacuous: the update moved weights far beyond the tolerance.
            moved = max((p.detach() - th).abs().max().item() for p, th in zip(params, theta0))
            assert moved > 1e3 * ulp(torch.tensor(1.0)).item()
        if nonzero >= 2:
            break
    assert nonzero >= 1, "no step changed F1: the test did not exercise an update"
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# a short run of the example
# ----------------------------------------------------------------------------------------------

def test_short_run_never_needs_gradients(monkeypatch, warm_state):
    """run_mezo for a few steps: every evaluation of the objective (the closure's and the dev
    evaluations) runs with autograd off, although the parameters require grad; no .grad appears; the
    curve's rows are the F1s that were computed (dev F1 at steps 0, 2, 4; train F1 the mean of the
    closure's F1s since the previous row) and nonzero_steps counts the steps whose two F1s differed."""
    vocab = gf.task_vocab()
    model = _model(warm_state)
    assert all(p.requires_grad for p in model.parameters())
    calls = []
    real = gf.batch_f1

    def spy(model, vocab, batch, *args, **kwargs):
        value = real(model, vocab, batch, *args, **kwargs)
        calls.append((torch.is_grad_enabled(), len(batch), value))
        return value

    monkeypatch.setattr(gf, "batch_f1", spy)
    with torch.enable_grad():
        result = gf.run_mezo(model, vocab, gf.build_kv_qa(64, seed=0), gf.build_kv_qa(32, seed=1),
                             steps=4, lr=LR, eps=EPS, batch=8, seed=0, eval_every=2, log=lambda *_: None)
    assert len(calls) == 2 * 4 + 3  # two per step, dev F1 at steps 0, 2, 4
    assert not any(enabled for enabled, _, _ in calls)
    assert all(p.grad is None for p in model.parameters())
    dev = [value for _, n, value in calls if n == 32]
    pairs = [value for _, n, value in calls if n == 8]
    pairs = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    curve = result["curve"]
    assert [row["step"] for row in curve] == [0, 2, 4]
    assert [row["dev_f1"] for row in curve] == dev
    means = [sum(a + b for a, b in pairs[:2]) / 4, sum(a + b for a, b in pairs[2:]) / 4]
    assert curve[0]["train_f1"] is None
    assert [row["train_f1"] for row in curve[1:]] == pytest.approx(means, rel=1e-12)
    assert result["skipped_steps"] == 0
    assert result["nonzero_steps"] == sum(a != b for a, b in pairs)


def test_command_line_writes_the_curve(tmp_path, capsys):
    out = tmp_path / "curve.json"
    report = gf.main(["--steps", "3", "--seed", "1", "--warmup-steps", "2", "--n-train", "64",
                      "--n-dev", "16", "--eval-every", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [row["step"] for row in saved["curve"]] == [0, 2, 3]
    assert saved["dev_f1_before_mezo"] == saved["curve"][0]["dev_f1"]
    assert saved["dev_f1_after_mezo"] == saved["curve"][-1]["dev_f1"]
    assert saved["settings"]["seed"] == 1 and len(saved["warmup_losses"]) == 2
    printed = capsys.readouterr().out
    assert "MeZO on -F1: dev F1" in printed
