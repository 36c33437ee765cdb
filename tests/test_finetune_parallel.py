"""``torchrun -m fastmezo finetune``: the MeZO methods data-parallel over 2 CPU ranks (gloo), on the tiny
random Llama of test_finetune_causal.py.

What must hold: each rank trains on its own micro-batch (its half of the global batch) and the step
uses the mean of the ranks' losses, so the run is the single-process run at twice the batch size up to
float rounding; rank 0 alone writes the results folder and one trajectory; methods that do not train
with MeZO are refused under torchrun with a clear error.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

from test_finetune_causal import data_csv, tiny_lm  # noqa: E402,F401  (fixtures)

from fastmezo.trajectory import Trajectory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _options(tiny_lm, data_csv, out, batch):
    return ["finetune", "--model", str(tiny_lm), "--data", str(data_csv), "--text-column", "review",
            "--label-column", "sentiment", "--template", "{} label :", "--k", "4", "--steps", "4",
            "--batch-size", str(batch), "--eps", "1e-2", "--eval-every", "2", "--no-progress", "--out", str(out)]


def _torchrun(argv, tmp_path, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "fastmezo", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _grads(path):
    return [record["grads"][0] for record in Trajectory.load(path).records]


@pytest.fixture(scope="module")
def runs(tiny_lm, data_csv, tmp_path_factory):
    """The same MeZO run data-parallel (2 ranks, micro-batch 2) and in one process (batch 4)."""
    tmp = tmp_path_factory.mktemp("parallel")
    dp = _torchrun(_options(tiny_lm, data_csv, tmp / "dp", 2) + ["--methods", "mezo"], tmp)
    assert dp.returncode == 0, dp.stderr[-3000:]
    from fastmezo.__main__ import main
    assert main(_options(tiny_lm, data_csv, tmp / "one", 4) + ["--methods", "mezo", "--no-isolate"]) == 0
    return tmp / "dp", tmp / "one", dp


def test_data_parallel_is_the_single_process_run_at_the_global_batch(runs):
    dp, one, _ = runs
    g_dp, g_one = _grads(dp / "trajectory-mezo.jsonl"), _grads(one / "trajectory-mezo.jsonl")
    assert len(g_dp) == len(g_one) == 4 and all(g != 0 for g in g_one)
    # The losses agree to float32 rounding (different padding and summation order in the forwards);
    # the projected gradient divides their difference by 2 eps = 0.02, hence the tolerance.
    assert g_dp == pytest.approx(g_one, rel=1e-3, abs=1e-3)
    # Had each rank trained on the global batch's first half (the same micro-batch everywhere), the
    # gradients would be another run's: guard that the comparison can tell runs apart.
    other = _grads(one / "trajectory-mezo.jsonl")[1:] + [0.0]
    assert g_dp != pytest.approx(other, rel=1e-3, abs=1e-3)
    rows = {r["method"]: r for r in json.loads((dp / "results.json").read_text())["methods"]}
    ref = {r["method"]: r for r in json.loads((one / "results.json").read_text())["methods"]}
    assert rows["mezo"]["test_acc"] == ref["mezo"]["test_acc"] and rows["mezo"]["dev_curve"] == ref["mezo"]["dev_curve"]


def test_rank_zero_alone_records_the_run(runs):
    dp, _, proc = runs
    record = json.loads((dp / "results.json").read_text())
    assert record["config"]["world_size"] == 2 and record["command"].startswith("torchrun -m fastmezo finetune")
    assert [r["method"] for r in record["methods"]] == ["mezo"] and record["state"] == "done"
    assert sorted(p.name for p in dp.iterdir()) == ["comparison.png", "results.csv", "results.json", "results.md",
                                                     "trajectory-mezo.jsonl"]
    assert proc.stdout.count("== mezo:") == 1 and "data parallel over 2 ranks" in proc.stdout


def test_methods_without_mezo_are_refused_under_torchrun(tiny_lm, data_csv, tmp_path):
    proc = _torchrun(_options(tiny_lm, data_csv, tmp_path / "o", 2) + ["--methods", "mezo,ft-adam"], tmp_path)
    assert proc.returncode != 0
    assert "under torchrun only the MeZO methods run" in proc.stderr and "ft-adam" in proc.stderr
    assert not (tmp_path / "o").exists()
