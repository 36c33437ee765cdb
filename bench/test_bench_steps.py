"""pytest-benchmark entry points for whole MeZO steps (fastmezo.MeZO in place and in exact mode against
the baseline step, and the two forwards alone), and checks of the step benchmark's pieces.

    python -m pytest bench/test_bench_steps.py -q                    # CPU: tiny OPT, seconds
    python -m pytest bench/test_bench_steps.py -q --benchmark-only   # on a GPU: OPT-1.3B fp16, 4x256

The benchmark cases run on whatever device is present: on a GPU an OPT-1.3B in float16 at batch 4 x 256
tokens, on the CPU a tiny OPT in float32 (the times then mean nothing; they show the cases run). The
other tests check behaviour, not speed: the rows' keys and arithmetic (the four fastmezo variants, their
exact / in-place ratios), exact mode removed from the model (and verified) after its rows, the OPT-66B
batch search's out-of-memory handling, and the CLI end to end. Whole steps against the torch oracle:
tests/test_gpu_steps.py.
"""
import contextlib
import csv
import json
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # Triton's interpreter on CPU tensors; must be set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import bench_steps as BS  # noqa: E402
from bench import models as M  # noqa: E402
from bench import opt66b  # noqa: E402
from bench import step_variants as SV  # noqa: E402
from bench.baseline import baseline_step  # noqa: E402
from bench.common import DTYPES, META_FIELDS, fastmezo_backend, free_memory, synced  # noqa: E402
from bench.shapes import numel, opt_param_shapes  # noqa: E402
from fastmezo.exact_groups import MIN_GROUP_BYTES  # noqa: E402

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
    return fastmezo_backend(DEVICE)


@pytest.fixture(scope="module")
def bench_setup(backend):
    """The benchmark model, its batch and both steppers (built once for the three cases)."""
    model = M.build_model(BENCH_MODEL, BENCH_DTYPE, DEVICE, log=lambda *a: None)
    ids = M.make_batch(model.config.vocab_size, *BENCH_BATCH, DEVICE)
    closure = M.make_closure(model, ids)
    yield model, closure, SV.make_optimizer(model, backend), SV.BaselineStepper(model)
    del model, closure
    free_memory(DEVICE)


@pytest.mark.parametrize("impl", ["forward", "reference", "fastmezo", "fastmezo-exact"])
def test_step(benchmark, bench_setup, backend, impl):
    """One whole MeZO step (or the two forwards it contains) on the benchmark model; fastmezo in place
    (MeZO's default rounding) and in exact mode (stochastic rounding, patched for this case only)."""
    model, closure, opt, ref = bench_setup

    @torch.no_grad()
    def forwards():
        float(closure())
        float(closure())

    with contextlib.ExitStack() as stack:
        if impl == "fastmezo-exact":
            opt, _ = stack.enter_context(SV.fastmezo_variant(model, "exact-sr", backend))
            opt.step(closure)  # the read check of exact mode's first forward: not timed
        fn = {"forward": forwards, "reference": lambda: ref.step(closure)}.get(impl, lambda: opt.step(closure))
        benchmark.group = f"step {BENCH_MODEL} {str(BENCH_DTYPE).split('.')[-1]} {BENCH_BATCH[0]}x{BENCH_BATCH[1]}"
        if HAS_CUDA:
            benchmark.pedantic(synced(fn, DEVICE), rounds=5, warmup_rounds=2, iterations=1)
        else:
            benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
    if impl.startswith("fastmezo"):
        assert opt.skipped_steps == 0 and math.isfinite(opt.projected_grad)
    if impl == "reference":
        assert math.isfinite(ref.last_projected_grad)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_build_model_tiny():
    """The model is built on the device in the dtype, tied, with the shapes.py parameter count and
    OPT's initialisation (N(0, 0.02) matrices, zero biases, unit layer norms)."""
    dtype = DTYPES[TINY_DTYPE]
    model = M.build_model("opt-tiny", dtype, DEVICE, log=lambda *a: None)
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


def test_baseline_step_is_the_algorithm():
    """baseline_step = perturb +eps, loss, -2 eps, loss, g = (l+ - l-) / 2eps, restore, update, with z
    drawn as baseline_perturb draws it (so the update moves along -lr g z)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    names = ["w", "b.bias"]
    start = [p.clone() for p in params]
    eps, lr, wd, seed = 1e-2, 0.1, 0.5, 11
    seen = []

    def closure():
        seen.append([p.clone() for p in params])
        return sum((p.double() ** 2).sum() for p in params)

    loss_plus, grad = baseline_step(params, names, closure, seed, eps, lr, wd)
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
    """bench_model on a tiny OPT with all variants: the rows are complete and consistent: per configuration forward, reference,
    inplace-rn, inplace-update, inplace-sr, exact-rn, exact-sr; positive times, overhead = step - two forwards, speed-ups
    = reference / variant, x floor = overhead / floor, exact / in-place ratios of the same rounding;
    peak memory is measured on a GPU and n/a (None) on the CPU; exact mode's live copies peak at its
    group (here the whole model) and its rows say the restore was verified."""
    bandwidth = 50e9
    summary, rows = BS.bench_model("opt-tiny", TINY_DTYPE, DEVICE, [(2, 16), (1, 8)], bandwidth,
                                   warmup=0, reps=2, backend=backend, log=lambda *a: None)
    assert "skipped" not in summary and summary["floor_ms"] == pytest.approx(2 * summary["param_bytes"] / bandwidth * 1e3)
    assert summary["variants"] == list(SV.VARIANTS)
    order = ["forward", "reference", "inplace-rn", "inplace-update", "inplace-sr", "exact-rn", "exact-sr"]
    assert len(rows) == 14 and [r["variant"] for r in rows] == order * 2
    embedding = summary["largest_tensor_bytes"]
    assert embedding == M.opt_config("opt-tiny").vocab_size * 64 * DTYPES[TINY_DTYPE].itemsize
    for r in rows:
        assert set(BS.STEP_FIELDS) - set(r) <= set(META_FIELDS)
        assert r["ms_median"] > 0 and r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["reps"] == 2
    for i in (0, 7):
        t = {r["variant"]: r for r in rows[i:i + 7]}
        fwd, ref = t["forward"], t["reference"]
        assert (fwd["impl"], ref["impl"]) == ("forward", "reference")
        assert fwd["overhead_ms"] is None and fwd["speedup_step_vs_reference"] is None
        for name in order[1:]:
            r = t[name]
            assert r["forward2_ms"] == fwd["ms_median"]
            assert r["overhead_ms"] == pytest.approx(r["ms_median"] - fwd["ms_median"])
            assert r["overhead_x_floor"] == pytest.approx(r["overhead_ms"] / summary["floor_ms"])
            assert r["zo_share"] == pytest.approx(r["overhead_ms"] / r["ms_median"])
            assert r["speedup_step_vs_reference"] == pytest.approx(ref["ms_median"] / r["ms_median"])
            assert math.isfinite(r["loss"])
            if name == "reference":
                continue
            assert (r["impl"], r["mode"], r["passes"]) == ("fastmezo", name.split("-")[0], 3)
            assert r["rounding"] == {"rn": "nearest", "update": "update", "sr": "stochastic"}[name.split("-")[1]]
            if r["overhead_ms"] > 0:  # on a tiny CPU model noise can make the overhead <= 0: then n/a
                assert r["speedup_overhead_vs_reference"] == pytest.approx(ref["overhead_ms"] / r["overhead_ms"])
            else:
                assert r["speedup_overhead_vs_reference"] is None
        assert ref["speedup_step_vs_reference"] == pytest.approx(1.0) and ref["passes"] == 4
        for rnd in ("rn", "sr"):
            exact, inplace = t[f"exact-{rnd}"], t[f"inplace-{rnd}"]
            assert exact["step_vs_inplace"] == pytest.approx(exact["ms_median"] / inplace["ms_median"])
            if inplace["overhead_ms"] > 0:
                assert exact["overhead_vs_inplace"] == pytest.approx(exact["overhead_ms"] / inplace["overhead_ms"])
            else:
                assert exact["overhead_vs_inplace"] is None
            assert inplace["overhead_vs_inplace"] is None and inplace["exact_copy_peak_bytes"] is None
            assert exact["restore_checked"] is True and inplace["restore_checked"] is False
            # The default group budget (the largest weight, at least MIN_GROUP_BYTES) holds the whole tiny
            # model: one hooked module, all trained weights (the tied embedding once) alive at once.
            assert exact["exact_group_bytes"] == max(embedding, MIN_GROUP_BYTES)
            assert exact["exact_hooked_modules"] == 1 and inplace["exact_hooked_modules"] is None
            assert exact["exact_copy_peak_bytes"] == summary["param_bytes"]
        if HAS_CUDA:
            assert fwd["peak_bytes"] > 0 and fwd["peak_extra_vs_inference_bytes"] == 0
            assert all(t[v]["peak_extra_vs_inference_bytes"] is not None for v in order)
        else:
            assert all(t[v]["peak_bytes"] is None and t[v]["peak_extra_vs_inference_bytes"] is None for v in order)


def test_bench_model_variant_subset(backend):
    """--variants picks the rows: an exact variant without its in-place twin has no ratio; --rounding's
    variant sets are the two of one rounding."""
    summary, rows = BS.bench_model("opt-tiny", TINY_DTYPE, DEVICE, [(1, 8)], 50e9, warmup=0, reps=1,
                                   backend=backend, log=lambda *a: None, variants=["exact-sr"])
    assert [r["variant"] for r in rows] == ["forward", "reference", "exact-sr"]
    assert rows[2]["overhead_vs_inplace"] is None and rows[2]["step_vs_inplace"] is None
    assert SV.variants_of_rounding("nearest") == ["inplace-rn", "exact-rn"]
    assert SV.variants_of_rounding(None) == list(SV.VARIANTS)


def test_exact_variant_is_removed_and_verified(backend):
    """fastmezo_variant patches exact mode for its block only: inside, hooks are on the model and steps
    run; on exit the hooks are gone, every module holds its stored parameter again and mezo_step is
    gone. verify_restored notices a hook left behind and a parameter swapped for a copy."""
    model = M.build_model("opt-tiny", DTYPES[TINY_DTYPE], DEVICE, log=lambda *a: None)
    closure = M.make_closure(model, M.make_batch(model.config.vocab_size, 1, 8, DEVICE))
    before = SV.model_hooks_state(model)
    params = {n: p for n, p in model.named_parameters()}
    assert sum(len(h[1]) + len(h[2]) for h in before["hooks"]) == 0
    with SV.fastmezo_variant(model, "exact-sr", backend) as (opt, exact):
        assert exact.active and opt.perturbation_mode == "exact" and opt.stochastic_rounding
        assert "mezo_step" in model.__dict__
        hooked = SV.model_hooks_state(model)
        assert sum(len(h[1]) + len(h[2]) for h in hooked["hooks"]) > 0
        with pytest.raises(RuntimeError, match="hooks differ"):
            SV.verify_restored(model, before)
        opt.step(closure)
        opt.step(closure)
        assert opt.step_count == 2 and exact.live_tensors == 0 and exact.materialized > 0
    assert not exact.active
    record = SV.verify_restored(model, before, exact=exact)
    assert record == {"params_checked": len(before["params"]), "hooks": 0}
    assert all(p is params[n] for n, p in model.named_parameters()) and "mezo_step" not in model.__dict__
    # The in-place variant keeps one optimizer per variant (its step count goes on across configurations).
    optimizers = {}
    with SV.fastmezo_variant(model, "inplace-rn", backend, optimizers) as (opt, exact):
        assert exact is None and not opt.stochastic_rounding and optimizers == {"inplace-rn": opt}

    handle = model.lm_head.register_forward_hook(lambda *a: None)
    with pytest.raises(RuntimeError, match="hooks differ"):
        SV.verify_restored(model, before)
    handle.remove()
    stored = model.model.decoder.layers[0].fc1._parameters["weight"]
    model.model.decoder.layers[0].fc1._parameters["weight"] = stored.detach().clone()
    with pytest.raises(RuntimeError, match="not the stored tensors"):
        SV.verify_restored(model, before)
    model.model.decoder.layers[0].fc1._parameters["weight"] = stored
    SV.verify_restored(model, before)


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
    model = M.build_model("opt-tiny", DTYPES[TINY_DTYPE], DEVICE, log=lambda *a: None)
    current = {"batch": 0}
    real_make_batch = M.make_batch

    def make_batch(vocab, batch, tokens, device, seed=0):
        current["batch"] = batch
        return real_make_batch(vocab, batch, tokens, device, seed)

    monkeypatch.setattr(opt66b, "make_batch", make_batch)
    steppers = {"fastmezo": _fake_oom(2, current), "reference": _fake_oom(1, current)}
    rows, largest = opt66b.search_max_batch(model, DEVICE, 8, [1, 2, 4, 8, 16], backend, log=lambda *a: None,
                                        steppers=steppers)
    assert largest == {"fastmezo": 2, "reference": 1}
    status = {(r["impl"], r["batch"]): r["status"] for r in rows}
    assert status[("reference", 2)] == "oom" and status[("fastmezo", 4)] == "oom"
    assert status[("fastmezo", 2)] == "ok" and ("reference", 4) not in status
    assert not any(r["batch"] == 8 for r in rows)  # both out of memory: search over
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok")
    assert "fake" in next(r["error"] for r in rows if r["status"] == "oom")

    # A forward that does not fit ends the search for everyone.
    real_closure = M.make_closure

    def make_closure(m, ids):
        inner = real_closure(m, ids)

        def closure():
            if current["batch"] > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (fake, in the forward)")
            return inner()
        return closure

    monkeypatch.setattr(opt66b, "make_closure", make_closure)
    rows, largest = opt66b.search_max_batch(model, DEVICE, 8, [1, 2, 4], backend, log=lambda *a: None,
                                        steppers={"fastmezo": torch.no_grad()(lambda c: float(c()))})
    assert largest == {"fastmezo": 1}
    assert [(r["impl"], r["batch"], r["status"]) for r in rows][-1] == ("fastmezo", 2, "forward oom")

    def broken(closure):
        raise ValueError("not an out-of-memory error")
    with pytest.raises(ValueError):
        opt66b.search_max_batch(model, DEVICE, 8, [1], backend, log=lambda *a: None, steppers={"x": broken})


def test_opt66b_path_on_a_tiny_model(backend):
    """bench_opt66b end to end with a tiny model in place of OPT-66B: built and searched."""
    out = opt66b.bench_opt66b(DEVICE, TINY_DTYPE, tokens=8, max_batch=2, backend=backend, log=lambda *a: None,
                          name="opt-tiny")
    assert out["largest"] == {"fastmezo": 2, "reference": 2}
    assert {r["impl"] for r in out["rows"]} == {"forward", "fastmezo", "reference"}
    assert all(r["model"] == "opt-tiny" and r["status"] == "ok" for r in out["rows"])


def test_cli_smoke(tmp_path):
    """bench_steps --smoke end to end (one batch configuration): JSON and CSV with the environment on
    every row, the kernel checks, and the table's memory columns: MiB on CUDA, n/a where the CPU has no
    memory statistics. (Other columns may read n/a on a GPU too: a tiny model's overhead can be <= 0.)"""
    result = BS.main(["--smoke", "--configs", "1x8", "--reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("steps-*.json")
    (csv_path,) = tmp_path.glob("steps-*.csv")
    data = json.loads(json_path.read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["commit"] and env["gpu"] and "transformers" in env
    assert data["checks"] and all(c["ok"] for c in data["checks"])
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["impl"] for r in rows] == ["forward", "reference"] + ["fastmezo"] * len(SV.VARIANTS) == [r["impl"] for r in result["rows"]]
    assert [r["variant"] for r in rows] == ["forward", "reference", *SV.VARIANTS]
    assert data["settings"]["variants"] == list(SV.VARIANTS)
    assert all(r["gpu"] == env["gpu"] and r["commit"] == env["commit"] and float(r["ms_median"]) > 0 for r in rows)
    table = BS.format_table(result)
    assert "exact-sr" in table and "exact/inplace" in table
    (forward_line,) = [line for line in table.splitlines() if line.startswith("opt-tiny") and line.split()[3] == "forward"]
    assert forward_line.split()[-1] == ("0" if HAS_CUDA else "n/a")   # extra MiB of the forward row


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


def test_parse_variants_and_rounding_shortcut():
    assert BS.parse_args([]).variants == ["inplace-rn", "inplace-update", "inplace-sr", "exact-rn", "exact-sr"]
    assert BS.parse_args(["--variants", "exact-sr,inplace-sr"]).variants == ["inplace-sr", "exact-sr"]
    assert BS.parse_args(["--variants", "all"]).variants == list(SV.VARIANTS)
    args = BS.parse_args(["--rounding", "nearest"])
    assert args.variants == ["inplace-rn", "exact-rn"] and args.rounding == "nearest"
    assert BS.parse_args(["--rounding", "stochastic", "--variants", "exact-sr"]).variants == ["exact-sr"]
    for bad in (["--variants", "exact"], ["--variants", ","], ["--rounding", "nearest", "--variants", "exact-sr"]):
        with pytest.raises(SystemExit):
            BS.parse_args(bad)
