"""run_all.py: the one-command benchmark suite. The smoke run proves, on a CPU, that the script runs both
benchmarks end to end and writes its JSON, CSV, plot and markdown summary; the other tests check the
summary and plot on hand-made results (including an OPT-66B search) and the option defaults."""
import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton's interpreter on CPU tensors; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import run_all  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_smoke(tmp_path):
    """run_all.py --smoke: the pass and step benchmarks on tiny shapes, then results.json (environment
    on top), both benchmarks' CSV and JSON, summary.png and summary.md."""
    result = run_all.main(["--smoke", "--out", str(tmp_path), "--configs", "1x8", "--step-reps", "1",
                           "--step-warmup", "0"])
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    for key in ("gpu", "torch", "triton", "cuda", "commit", "date", "transformers"):
        assert env[key], key
    assert data["passes"]["rows"] and data["steps"]["rows"] and "error" not in data
    assert all(c["ok"] for c in data["passes"]["checks"] + data["steps"]["checks"])
    # One bandwidth for the whole run: the step benchmark reuses the pass benchmark's measurement.
    assert data["steps"]["bandwidth"] == data["passes"]["bandwidth"]
    assert len(list(tmp_path.glob("perturb-*.csv"))) == 1 and len(list(tmp_path.glob("steps-*.csv"))) == 1
    assert (tmp_path / "summary.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "summary.md").read_text()
    assert "| model | dtype | floor ms |" in md and "| opt-tiny |" in md and "1x8" in md
    assert env["gpu"] in md and env["commit"][:12] in md
    # The variants table: every variant's step time, the exact / in-place ratios, exact mode's memory.
    assert ("| model | dtype | batch x tokens | 2 forwards | reference | inplace-rn | inplace-update | inplace-sr "
            "| exact-rn | exact-sr | exact / in place overhead rn / sr | extra MiB exact-rn / exact-sr |") in md
    assert {r["variant"] for r in data["steps"]["rows"]} == {"forward", "reference", "inplace-rn", "inplace-update",
                                                             "inplace-sr", "exact-rn", "exact-sr"}
    assert ("n/a / n/a" in md) == (not HAS_CUDA)  # no memory statistics on the CPU
    assert sorted(result["files"]["csv"]) == sorted(str(p) for p in tmp_path.glob("*.csv"))


def _fake_results():
    """Hand-made results in the benchmarks' formats: one model, one batch configuration, and an
    OPT-66B search where the reference runs out of memory one batch earlier than fastmezo."""
    def pass_row(impl, op, ms, derived=False):
        return {"model": "opt-13b", "dtype": "float16", "impl": impl, "op": op, "noise": "gaussian", "ms_median": ms,
                "ratio_to_floor": ms / 12.0, "floor_ms": 12.0, "speedup_vs_reference": 1.0, "derived": derived}
    passes = {"rows": [pass_row("fastmezo", "perturb", 24.0), pass_row("fastmezo", "restore_and_update", 25.0),
                       pass_row("reference", "perturb", 78.0), pass_row("reference", "update", 109.0),
                       pass_row("reference", "step", 343.0, True),
                       {**pass_row("fastmezo", "step", 73.0, True), "speedup_vs_reference": 343 / 73}],
              "models": [{"model": "opt-66b", "dtype": "float16", "skipped": "needs 132 GiB"}]}

    def step_row(variant, ms, peak, inplace_overhead=None):
        overhead = None if variant == "forward" else ms - 100.0
        impl = variant if variant in ("forward", "reference") else "fastmezo"
        return {"model": "opt-13b", "dtype": "float16", "batch": 4, "tokens": 256, "impl": impl, "variant": variant,
                "mode": None if impl != "fastmezo" else variant.split("-")[0], "ms_median": ms,
                "overhead_ms": overhead, "overhead_x_floor": None if overhead is None else overhead / 12.0,
                "speedup_step_vs_reference": None if overhead is None else 440.0 / ms,
                "speedup_overhead_vs_reference": None if overhead is None else 340.0 / overhead,
                "overhead_vs_inplace": None if inplace_overhead is None else overhead / inplace_overhead,
                "peak_extra_vs_inference_bytes": peak, "rounding": "stochastic" if variant.endswith("-sr") else "nearest"}
    big_rows = [{"batch": b, "tokens": 256, "impl": impl, "status": status, "ms": ms, "peak_bytes": 130 << 30,
                 "peak_extra_vs_inference_bytes": 0}
                for b, impl, status, ms in [(1, "forward", "ok", 90.0), (1, "fastmezo", "ok", 400.0),
                                            (1, "reference", "ok", 2000.0), (2, "forward", "ok", 150.0),
                                            (2, "fastmezo", "ok", 500.0), (2, "reference", "oom", None)]]
    steps = {"rows": [step_row("forward", 100.0, 0), step_row("reference", 440.0, 2 << 30),
                      step_row("inplace-rn", 170.0, 0), step_row("inplace-sr", 180.0, 0),
                      step_row("exact-rn", 191.0, 491 << 20, 70.0), step_row("exact-sr", 204.0, 492 << 20, 80.0)],
             "settings": {"backend": "triton"}, "models": [],
             "opt66b": {"summary": {"model": "opt-66b", "dtype": "float16", "tokens": 256, "batches": [1, 2, 4]},
                        "rows": big_rows, "largest": {"fastmezo": 2, "reference": 1}}}
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "transformers": "5.17",
           "commit": "0123456789abcdef", "dirty": False, "date": "2026-11-29", "device": "cuda:0"}
    return env, passes, steps


def test_summary_markdown_and_plot(tmp_path):
    """The markdown tables carry the numbers (pass x floor, step speed-up, overhead, memory, the OPT-66B
    largest batches), and the plot draws all three panels."""
    env, passes, steps = _fake_results()
    md = run_all.summary_markdown(env, passes, steps, {"bandwidth_bytes_per_s": 4.2e12})
    assert "NVIDIA H200" in md and "`0123456789ab`" in md and "4200 GB/s" in md
    assert "| opt-13b | float16 | 12.00 | 24.00 (2.0x) | 25.00 (2.1x) | 78.00 (6.5x) |" in md
    # The variants table: step ms of each, exact / in-place overhead ratio (rn / sr), exact mode's extra MiB.
    assert ("| opt-13b | float16 | 4x256 | 100.00 | 440.00 | 170.00 | 180.00 | 191.00 | 204.00 | 1.30x / 1.30x "
            "| 491 / 492 |") in md
    # The overhead table: reference / inplace-rn / inplace-sr / exact-rn / exact-sr.
    assert ("| opt-13b | float16 | 4x256 | 340.00 / 70.00 / 80.00 / 91.00 / 104.00 | 28.3 / 5.8 / 6.7 / 7.6 / 8.7 "
            "| 2.59x / 2.44x / 2.30x / 2.16x | 4.86x / 4.25x / 3.74x / 3.27x | 2048 / 0 / 0 / 491 / 492 |") in md
    assert "| fastmezo | 2 | 500.0 |" in md and "| reference | 1 | 2000.0 |" in md
    assert "opt-66b float16 skipped: needs 132 GiB" in md
    png = run_all.plot(passes, steps, tmp_path / "s.png", "title")
    assert png.read_bytes()[:8] == PNG_MAGIC
    # Nothing measured: still a plot and a summary, saying so.
    assert run_all.plot(None, None, tmp_path / "empty.png", "t").exists()
    assert "### fastmezo benchmarks" in run_all.summary_markdown(env, None, None, None)


def test_summary_of_a_subset_and_of_old_rows():
    """Only the variants measured get columns (no ratio without an in-place twin); rows of a
    bench_steps.py from before the variants (impl fastmezo, no variant) count as in-place rows."""
    env, _, steps = _fake_results()
    only_exact = {**steps, "rows": [r for r in steps["rows"] if r["variant"] in ("forward", "reference", "exact-sr")]}
    md = run_all.summary_markdown(env, None, only_exact, None)
    assert "| reference | exact-sr | extra MiB exact-sr |" in md and "exact / in place overhead" not in md
    assert "| 100.00 | 440.00 | 204.00 | 492 |" in md
    old = {**steps, "rows": [{k: v for k, v in r.items() if k not in ("variant", "mode", "overhead_vs_inplace")}
                             for r in steps["rows"][:2]]
           + [{**steps["rows"][3], "variant": None, "impl": "fastmezo"}]}
    md = run_all.summary_markdown(env, None, old, None)
    assert "| reference | inplace-sr |" in md and "| 100.00 | 440.00 | 180.00 |" in md


def test_parse_args():
    args = run_all.parse_args([])
    assert args.models == ["opt-1.3b", "opt-13b"] and args.dtypes == ["float16", "bfloat16"]
    assert args.configs == [(16, 256), (4, 256), (1, 128)] and args.pass_reps == 10 and not args.opt66b
    args = run_all.parse_args(["--quick"])
    assert args.models == ["opt-1.3b"] and args.dtypes == ["float16"] and len(args.configs) == 2
    args = run_all.parse_args(["--skip-steps", "--opt66b", "--models", "opt-13b", "--dtypes", "bfloat16"])
    assert args.skip_steps and args.opt66b and args.models == ["opt-13b"] and args.dtypes == ["bfloat16"]
    with pytest.raises(SystemExit):
        run_all.parse_args(["--dtypes", "int8"])
