"""pytest-benchmark entry points for whole MeZO steps (fastmezo.MeZO against the reference step, and the
two forwards alone), and checks of bench_steps.py's pieces.

    python -m pytest bench/test_bench_steps.py -q                    # CPU: tiny OPT, seconds
    python -m pytest bench/test_bench_steps.py -q --benchmark-only   # on a GPU: OPT-1.3B fp16, 4x256

The benchmark cases run on whatever device is present: on a GPU an OPT-1.3B in float16 at batch 4 x 256
tokens, on the CPU a tiny OPT in float32 (the times then mean nothing; they show the cases run). The
other tests check behaviour, not speed: the rows' keys and arithmetic, the model-step check catching a
wrong optimizer, the OPT-66B batch search's out-of-memory handling, and the CLI end to end.
"""
import csv
import json
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton's interpreter on CPU tensors; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import bench_steps as BS  # noqa: E402
from reference_mezo import reference_step  # noqa: E402
from shapes import numel, opt_param_shapes  # noqa: E402

DEVICE = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")
# The benchmark cases: a real size on a GPU, a tiny one on the CPU.
BENCH_MODEL, BENCH_DTYPE, BENCH_BATCH = (("opt-1.3b", torch.float16, (4, 256)) if HAS_CUDA
                                         else ("opt-tiny", torch.float32, (2, 16)))
# The behaviour tests: tiny everywhere (float16 on a GPU, where it is the common case).
TINY_DTYPE = "float16" if HAS_CUDA else "float32"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors on a 2-core CPU: intra-op threads (and the native backend's OpenMP threads) only
    add overhead, tens of times over when the machine is busy. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def backend():
    return BS.resolve_backend(DEVICE, None)


@pytest.fixture(scope="module")
def bench_setup(backend):
    """The benchmark model, its batch and both steppers (built once for the three cases)."""
    model = BS.build_model(BENCH_MODEL, BENCH_DTYPE, DEVICE, log=lambda *a: None)
    ids = BS.make_batch(model.config.vocab_size, *BENCH_BATCH, DEVICE)
    closure = BS.make_closure(model, ids)
    yield model, closure, BS.make_optimizer(model, backend), BS.ReferenceStepper(model)
    del model, closure
    BS.BP.free_memory(DEVICE)


def _synced(fn):
    def call():
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
    return call


@pytest.mark.parametrize("impl", ["forward", "reference", "fastmezo"])
def test_step(benchmark, bench_setup, impl):
    """One whole MeZO step (or the two forwards it contains) on the benchmark model."""
    model, closure, opt, ref = bench_setup

    @torch.no_grad()
    def forwards():
        float(closure())
        float(closure())

    fn = {"forward": forwards, "reference": lambda: ref.step(closure), "fastmezo": lambda: opt.step(closure)}[impl]
    benchmark.group = f"step {BENCH_MODEL} {str(BENCH_DTYPE).split('.')[-1]} {BENCH_BATCH[0]}x{BENCH_BATCH[1]}"
    if HAS_CUDA:
        benchmark.pedantic(_synced(fn), rounds=5, warmup_rounds=2, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    if impl == "fastmezo":
        assert opt.skipped_steps == 0 and math.isfinite(opt.projected_grad)
    if impl == "reference":
        assert math.isfinite(ref.last_projected_grad)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_build_model_tiny():
    """The model is built on the device in the dtype, tied, with the shapes.py parameter count and
    OPT's initialisation (N(0, 0.02) matrices, zero biases, unit layer norms)."""
    dtype = BS.DTYPES[TINY_DTYPE]
    model = BS.build_model("opt-tiny", dtype, DEVICE, log=lambda *a: None)
    params = dict(model.named_parameters())
    assert all(p.device.type == DEVICE.type and p.dtype == dtype for p in params.values())
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert sum(p.numel() for p in params.values()) == numel(opt_param_shapes("opt-tiny"))
    assert [n for n, _ in opt_param_shapes("opt-tiny")] == list(params)
    assert torch.all(params["model.decoder.layers.0.fc1.bias"] == 0)
    assert torch.all(params["model.decoder.layers.0.self_attn_layer_norm.weight"] == 1)
    std = params["model.decoder.layers.0.fc1.weight"].float().std().item()
    assert 0.015 < std < 0.025
    assert not model.training


def test_reference_step_is_the_algorithm():
    """reference_step = perturb +eps, loss, -2 eps, loss, g = (l+ - l-) / 2eps, restore, update, with z
    drawn as reference_perturb draws it (so the update moves along -lr g z)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    names = ["w", "b.bias"]
    start = [p.clone() for p in params]
    eps, lr, wd, seed = 1e-2, 0.1, 0.5, 11
    seen = []

    def closure():
        seen.append([p.clone() for p in params])
        return sum((p.double() ** 2).sum() for p in params)

    loss_plus, grad = reference_step(params, names, closure, seed, eps, lr, wd)
    torch.manual_seed(seed)
    z = [torch.normal(mean=0, std=1, size=p.size()) for p in start]
    torch.testing.assert_close(seen[0][0], start[0] + eps * z[0])
    torch.testing.assert_close(seen[1][1], start[1] - eps * z[1], atol=1e-6, rtol=0)
    lp = sum(((s + eps * zz).double() ** 2).sum() for s, zz in zip(start, z))
    lm = sum(((s - eps * zz).double() ** 2).sum() for s, zz in zip(start, z))
    assert abs(float(loss_plus) - float(lp)) < 1e-5
    assert abs(grad - float((lp - lm) / (2 * eps))) < 1e-3
    torch.testing.assert_close(params[0], start[0] - lr * (grad * z[0] + wd * start[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(params[1], start[1] - lr * grad * z[1], atol=1e-5, rtol=0)  # bias: no decay


def test_bench_model_rows(backend):
    """bench_model on a tiny OPT: the model-step check passes, and the rows are complete and consistent:
    positive times, overhead = step - two forwards, speed-ups = reference / fastmezo, x floor = overhead /
    floor; peak memory is measured on a GPU and n/a (None) on the CPU."""
    bandwidth = 50e9
    summary, rows, checks = BS.bench_model("opt-tiny", TINY_DTYPE, DEVICE, [(2, 16), (1, 8)], bandwidth,
                                           warmup=0, reps=2, backend=backend, log=lambda *a: None)
    assert "skipped" not in summary and summary["floor_ms"] == pytest.approx(2 * summary["param_bytes"] / bandwidth * 1e3)
    assert checks and all(c["ok"] for c in checks) and {c["what"] for c in checks} == {"MeZO.step"}
    assert len(rows) == 6 and [r["impl"] for r in rows[:3]] == ["forward", "reference", "fastmezo"]
    for r in rows:
        assert set(BS.STEP_FIELDS) - set(r) <= set(BS.META_FIELDS)
        assert r["ms_median"] > 0 and r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["reps"] == 2
    for i in (0, 3):
        fwd, ref, fast = rows[i:i + 3]
        assert fwd["overhead_ms"] is None and fwd["speedup_step_vs_reference"] is None
        for r in (ref, fast):
            assert r["forward2_ms"] == fwd["ms_median"]
            assert r["overhead_ms"] == pytest.approx(r["ms_median"] - fwd["ms_median"])
            assert r["overhead_x_floor"] == pytest.approx(r["overhead_ms"] / summary["floor_ms"])
            assert r["zo_share"] == pytest.approx(r["overhead_ms"] / r["ms_median"])
            assert math.isfinite(r["loss"])
        assert ref["speedup_step_vs_reference"] == pytest.approx(1.0)
        assert fast["speedup_step_vs_reference"] == pytest.approx(ref["ms_median"] / fast["ms_median"])
        if fast["overhead_ms"] > 0:  # on a tiny CPU model noise can make the overhead <= 0: then n/a
            assert fast["speedup_overhead_vs_reference"] == pytest.approx(ref["overhead_ms"] / fast["overhead_ms"])
        else:
            assert fast["speedup_overhead_vs_reference"] is None
        assert (ref["passes"], fast["passes"]) == (4, 3)
        if HAS_CUDA:
            assert fwd["peak_bytes"] > 0 and fwd["peak_extra_vs_inference_bytes"] == 0
            assert fast["peak_extra_vs_inference_bytes"] is not None
        else:
            assert all(r["peak_bytes"] is None and r["peak_extra_vs_inference_bytes"] is None for r in (fwd, ref, fast))


def test_model_step_check_catches_a_wrong_optimizer(monkeypatch, backend):
    """The benchmark refuses to time a MeZO whose passes do not do what the oracle says (here: none)."""
    import fastmezo.optim

    model = BS.build_model("opt-tiny", BS.DTYPES[TINY_DTYPE], DEVICE, log=lambda *a: None)
    named = BS.trainable(model)
    assert all(r["ok"] for r in BS.check_model_step(named, DEVICE, backend))
    monkeypatch.setattr(fastmezo.optim.F, "_run", lambda *a, **k: None)
    with pytest.raises(BS.CheckFailed, match="disagrees"):
        BS.check_model_step(named, DEVICE, backend)


def _fake_oom(limit, current):
    """A step function that runs out of memory above batch ``limit`` (the current batch is in current)."""
    def step(closure):
        if current["batch"] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        with torch.no_grad():
            return float(closure())
    return step


def test_opt66b_search_handles_out_of_memory(monkeypatch, backend):
    """The batch search records out-of-memory per implementation, keeps going for the others, stops at
    the first batch where even a plain forward does not fit, and lets other errors through."""
    model = BS.build_model("opt-tiny", BS.DTYPES[TINY_DTYPE], DEVICE, log=lambda *a: None)
    current = {"batch": 0}
    real_make_batch = BS.make_batch

    def make_batch(vocab, batch, tokens, device, seed=0):
        current["batch"] = batch
        return real_make_batch(vocab, batch, tokens, device, seed)

    monkeypatch.setattr(BS, "make_batch", make_batch)
    steppers = {"fastmezo": _fake_oom(2, current), "reference": _fake_oom(1, current)}
    rows, largest = BS.search_max_batch(model, DEVICE, 8, [1, 2, 4, 8, 16], backend, log=lambda *a: None,
                                        steppers=steppers)
    assert largest == {"fastmezo": 2, "reference": 1}
    status = {(r["impl"], r["batch"]): r["status"] for r in rows}
    assert status[("reference", 2)] == "oom" and status[("fastmezo", 4)] == "oom"
    assert status[("fastmezo", 2)] == "ok" and ("reference", 4) not in status
    assert not any(r["batch"] == 8 for r in rows)  # both out of memory: search over
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok")
    assert "fake" in next(r["error"] for r in rows if r["status"] == "oom")

    # A forward that does not fit ends the search for everyone.
    real_closure = BS.make_closure

    def make_closure(m, ids):
        inner = real_closure(m, ids)

        def closure():
            if current["batch"] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (fake, in the forward)")
            return inner()
        return closure

    monkeypatch.setattr(BS, "make_closure", make_closure)
    rows, largest = BS.search_max_batch(model, DEVICE, 8, [1, 2, 4], backend, log=lambda *a: None,
                                        steppers={"fastmezo": torch.no_grad()(lambda c: float(c()))})
    assert largest == {"fastmezo": 1}
    assert [(r["impl"], r["batch"], r["status"]) for r in rows][-1] == ("fastmezo", 2, "forward oom")

    def broken(closure):
        raise ValueError("not an out-of-memory error")
    with pytest.raises(ValueError):
        BS.search_max_batch(model, DEVICE, 8, [1], backend, log=lambda *a: None, steppers={"x": broken})


def test_opt66b_path_on_a_tiny_model(backend):
    """bench_opt66b end to end with a tiny model in place of OPT-66B: built, checked, searched."""
    out = BS.bench_opt66b(DEVICE, TINY_DTYPE, tokens=8, max_batch=2, backend=backend, log=lambda *a: None,
                          name="opt-tiny")
    assert out["largest"] == {"fastmezo": 2, "reference": 2}
    assert out["checks"] and all(c["ok"] for c in out["checks"])
    assert {r["impl"] for r in out["rows"]} == {"forward", "fastmezo", "reference"}
    assert all(r["model"] == "opt-tiny" and r["status"] == "ok" for r in out["rows"])


def test_cli_smoke(tmp_path):
    """bench_steps.py --smoke end to end (one batch configuration): JSON and CSV with the environment on
    every row, the kernel checks, and the table with n/a where the CPU has no memory statistics."""
    result = BS.main(["--smoke", "--configs", "1x8", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("steps-*.json")
    (csv_path,) = tmp_path.glob("steps-*.csv")
    data = json.loads(json_path.read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["commit"] and env["gpu"] and "transformers" in env
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["impl"] for r in rows] == ["forward", "reference", "fastmezo"] == [r["impl"] for r in result["rows"]]
    assert all(r["gpu"] == env["gpu"] and r["commit"] == env["commit"] and float(r["ms_median"]) > 0 for r in rows)
    table = BS.format_table(result)
    assert "fastmezo" in table and ("n/a" in table) == (not HAS_CUDA)


def test_parse_args():
    args = BS.parse_args(["--quick"])
    assert args.models == ["opt-1.3b"] and args.configs == list(BS.QUICK_CONFIGS) and args.step_reps == 3
    args = BS.parse_args(["--models", "none", "--opt66b", "--configs", "8x128"])
    assert args.models == [] and args.opt66b and args.opt66b_tokens == 256 and args.configs == [(8, 128)]
    assert BS.parse_args([]).configs == [(16, 256), (4, 256), (1, 128)]
    with pytest.raises(SystemExit):
        BS.parse_args(["--configs", "16by256"])
    with pytest.raises(SystemExit):
        BS.parse_args(["--models", "opt-7b"])
