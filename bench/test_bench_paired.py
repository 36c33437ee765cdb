"""Smoke test of bench/bench_paired.py: the whole script on the CPU (Triton interpreter, tiny OPT), its
check passed, its outputs written and consistent."""
import json
import os

import torch

if not torch.cuda.is_available():  # set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import bench_paired  # noqa: E402


def test_paired_smoke(tmp_path, capsys):
    assert bench_paired.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    check = result["check"]
    assert check["fused_paths"] == ["fused", "gathered", "materialized"] and check["ref_paths"] == ["gathered", "materialized"]
    assert check["loss_plus"] != check["loss_minus"]
    assert abs(check["grad"] - check["ref_grad"]) <= check["grad_tol"]
    for p in result["sweep"]["points"]:          # float32 layer: the two paths agree to float32 rounding
        assert p["fused_ms"] > 0 and p["materialize_ms"] > 0 and p["max_abs_diff"] <= 1e-5 * p["max_abs_output"]
    assert result["sweep"]["suggested_max_rows"] in {0} | {p["rows"] for p in result["sweep"]["points"]}
    rows = {r["what"]: r for r in result["steps"]}
    assert set(rows) == {"forward", "paired", "paired-fused", "inplace", "reference"}
    assert rows["paired"]["linear_paths"] == ["materialized"] and rows["paired"]["paths"]["materialized"] >= 13
    for what in ("paired", "paired-fused", "inplace"):
        r = rows[what]
        assert r["speedup_vs_reference"] == rows["reference"]["ms_median"] / r["ms_median"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| 1x8 | paired |" in summary and "Suggested row threshold" in summary
    assert "[check opt-tiny]" in capsys.readouterr().out
