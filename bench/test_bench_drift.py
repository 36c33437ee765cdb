"""Smoke test of bench/bench_drift.py: a few null steps of every method on a tiny tensor, outputs
written, exact mode bit-identical (the script asserts it), in-place drift non-zero in bfloat16."""
import json
import os

import torch

if not torch.cuda.is_available():  # as in test_bench_perturb: set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import bench_drift  # noqa: E402


def test_drift_smoke(tmp_path, capsys):
    assert bench_drift.main(["--device", "cpu", "--sizes", "256", "--checkpoints", "1,3",
                             "--dtypes", "bfloat16", "--out", str(tmp_path)]) == 0
    files = sorted(p.suffix for p in tmp_path.iterdir())
    assert files == [".csv", ".json", ".png"]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    drift = {(r["method"], r["steps"]): r["rel_drift"] for r in rows}
    assert set(drift) == {(m, t) for m in bench_drift.METHODS for t in (1, 3)}
    assert drift[("exact", 1)] == drift[("exact", 3)] == drift[("paired", 1)] == drift[("paired", 3)] == 0.0
    for method in ("reference", "inplace-rn", "inplace-sr"):
        # One bf16 null step moves a weight ~N(0, 0.02) by a fraction of its ulp (bfloat16 keeps 8 bits).
        assert 1e-3 < drift[(method, 1)] < 2e-2, method
    assert "relative drift" in capsys.readouterr().out
