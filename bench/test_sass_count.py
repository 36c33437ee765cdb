"""bench.sass_count compiles the kernels for sm_90 without a GPU: the pass kernel keeps every value in
the thread that made it (no shared-memory exchange, no spills), which the row tiles are for."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
    pytest.skip("this triton has no bundled CUDA tools", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


def _table():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compiled, not interpreted
    out = subprocess.run([sys.executable, "-m", "bench.sass_count"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=True).stdout.splitlines()
    header = out[0].split()
    return {line[:42].strip(): dict(zip(header[1:], map(int, line[42:].split()))) for line in out[1:]}


def test_pass_kernel_needs_no_shared_memory_and_spills_nothing():
    table = _table()
    passes = {label: row for label, row in table.items() if label.startswith("pass ")}
    assert len(passes) == 9 and any(label.startswith("paired ") for label in table)
    # The fused replay kernel with its per-pass choice of rounding compiles for the GPU too.
    assert {label for label in table if label.startswith("replay ")} == {
        f"replay {d} gaussian {r}" for d in ("fp16", "bf16") for r in ("nearest", "per-pass rounding")}
    for label, row in passes.items():
        assert row["STS"] == row["LDS"] == row["BAR"] == row["STL"] == row["LDL"] == 0, (label, row)
        assert row["MUFU"] == (16 if "gaussian" in label else 0), (label, row)   # log, sqrt, sin, cos: 4 pairs
    for dtype in ("fp16", "bf16"):
        for noise in ("gaussian", "rademacher"):
            near, sto = passes[f"pass {dtype} {noise} nearest"], passes[f"pass {dtype} {noise} stochastic"]
            assert near["total"] < sto["total"]
    # The pair pass (paired mode's copies) makes z once: a few more instructions than one pass, twice the stores.
    pair, one = passes["pass fp16 gaussian nearest pair"], passes["pass fp16 gaussian nearest"]
    assert one["total"] < pair["total"] < 1.5 * one["total"] and pair["STG"] == 2 * one["STG"]
