"""pytest-benchmark entry points for one perturbation pass, fastmezo against the baseline, and quick
checks of the benchmark's own pieces.

    python -m pytest bench -q                                   # here: CPU, small shapes
    python -m pytest bench -q -k "opt-1.3b" --benchmark-only    # on a GPU: OPT-1.3B shapes too

Without CUDA only the small shape set runs (fastmezo through the Triton interpreter, or its reference
backend where triton is missing); the GPU-size cases skip. The numbers on the CPU mean nothing: these
tests check that the benchmarks run. bench/bench_perturb.py is the benchmark proper.

There is no bench/conftest.py on purpose: tests/ imports its own conftest by name (``from conftest
import ...``), and a second conftest module would shadow it when both folders are collected at once.
"""
import csv
import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton's interpreter runs the kernels on CPU tensors; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import bench_perturb  # noqa: E402
from bench.baseline import baseline_perturb, baseline_update  # noqa: E402
from bench.common import CheckFailed, synced  # noqa: E402
from bench.shapes import opt_param_shapes, opt_shapes_from_sizes  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"

try:
    import triton  # noqa: F401
    FAST_BACKEND = "triton"
except ImportError:  # pragma: no cover
    FAST_BACKEND = "reference"

# A small OPT-shaped set: 1 layer, hidden 64 (20 tensors, ~50K parameters).
SMALL = opt_shapes_from_sizes(hidden=64, ffn=256, layers=1, vocab=512, max_positions=62)
SHAPE_SETS = {"small": SMALL, "opt-1.3b": opt_param_shapes("opt-1.3b")}
GPU_ONLY = {"opt-1.3b"}


def _params(shapes, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=gen, device=device, dtype=dtype).mul_(0.02) for _, s in shapes]


@pytest.mark.parametrize("impl", ["fastmezo-gaussian", "fastmezo-rademacher", "reference"])
@pytest.mark.parametrize("size", list(SHAPE_SETS))
def test_perturb_pass(benchmark, size, impl):
    """One perturbation pass (+1e-3 z) over every tensor of the shape set, in float16."""
    if size in GPU_ONLY and not HAS_CUDA:
        pytest.skip("GPU-size case: needs CUDA")
    from fastmezo import functional as F

    params = _params(SHAPE_SETS[size], torch.float16, DEVICE)
    if impl == "reference":
        fn = lambda: baseline_perturb(params, 0, 1.0, 1e-3)  # noqa: E731
    else:
        noise = impl.split("-")[1]
        backend = FAST_BACKEND if size == "small" else "triton"
        fn = lambda: F.perturb_(params, 1234, 1e-3, noise=noise, backend=backend)  # noqa: E731
    benchmark.group = f"perturb {size} float16"
    if HAS_CUDA:
        benchmark.pedantic(synced(fn, DEVICE), rounds=10, warmup_rounds=2, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    assert all(torch.isfinite(p).all() for p in params)


def test_baseline_perturb_restores():
    """+1, -2, +1 with one seed brings float32 parameters back (up to rounding)."""
    params = _params(SMALL[:6], torch.float32, "cpu")
    before = [p.clone() for p in params]
    for scale in (1, -2, 1):
        baseline_perturb(params, 7, scale, 1e-3)
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b, atol=1e-6, rtol=0)
    baseline_perturb(params, 7, 1, 1e-3)
    assert not torch.equal(params[0], before[0])


def test_baseline_update_formula():
    """theta - lr * (g * z + wd * theta), with z drawn as the paper's trainer draws it, and no weight
    decay for bias / layer-norm parameters."""
    shapes = SMALL[:6]
    names = [n for n, _ in shapes]
    params = _params(shapes, torch.float32, "cpu")
    before = [p.clone() for p in params]
    lr, g, wd = 1e-2, 0.5, 0.1
    baseline_update(params, 3, lr, g, wd, names)
    torch.manual_seed(3)
    for name, p, b in zip(names, params, before):
        z = torch.normal(mean=0, std=1, size=b.size(), dtype=b.dtype)
        decay = 0.0 if ("bias" in name or "layer_norm" in name) else wd
        torch.testing.assert_close(p, b - lr * (g * z + decay * b))
    with pytest.raises(ValueError, match="names"):
        baseline_update(params, 3, lr, g, wd, names[:2])


def test_check_catches_wrong_noise(monkeypatch):
    """The benchmark refuses to time kernels that disagree with the oracle."""
    from fastmezo import functional as F

    monkeypatch.setattr(F, "make_noise", lambda n, *a, **k: torch.zeros(n, device=k.get("device")))
    monkeypatch.setattr(F, "perturb_", lambda *a, **k: None)
    with pytest.raises(CheckFailed, match="disagree"):
        bench_perturb.check_kernels(torch.device(DEVICE), [torch.float32], 1024)


def test_smoke_run(tmp_path):
    """bench_perturb.py --smoke end to end (one dtype, one repetition): JSON, CSV and table."""
    result = bench_perturb.main(["--smoke", "--dtypes", "float32", "--reps", "1", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("perturb-*.json")
    (csv_path,) = tmp_path.glob("perturb-*.csv")
    data = json.loads(json_path.read_text())
    assert data["environment"]["commit"] and data["environment"]["torch"] == torch.__version__
    assert all(c["ok"] for c in data["checks"])
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    ops = {(r["impl"], r["op"], r["noise"]) for r in rows}
    assert ("fastmezo", "perturb", "gaussian") in ops and ("reference", "update", "gaussian") in ops
    assert ("fastmezo", "step", "rademacher") in ops and len(rows) == len(result["rows"]) == 9
    assert all(float(r["ms_median"]) > 0 and float(r["floor_ms"]) > 0 for r in rows)
    assert "x floor" in bench_perturb.format_table(result)
