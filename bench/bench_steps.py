"""Benchmark of WHOLE MeZO steps on OPT models: fastmezo.MeZO against the baseline (the paper's trainer),
with the two forward passes included.

    python -m bench.bench_steps [--models opt-1.3b,opt-13b] [--dtypes float16] [--configs 16x256,4x256,1x128]
                                [--variants inplace-rn,inplace-update,inplace-sr,exact-rn,exact-sr]
                                [--warmup N] [--reps N] [--out DIR] [--quick] [--smoke]
                                [--opt66b [--opt66b-tokens 256] [--opt66b-max-batch 128]]

For each model and dtype, one process builds a randomly initialised ``OPTForCausalLM`` on the GPU
(bench/models.py). The same model instance then serves the baseline and every fastmezo variant
(bench/step_variants.py). Per batch configuration (batch x tokens, random token ids, labels = input
ids, the causal-LM loss):

1. before any timing, the pass benchmark's kernel check (``bench_perturb.check_kernels``); whole steps
   are checked against the torch oracle by the GPU tests (``pytest -m gpu tests``, tests/test_gpu_steps.py);
2. ``forward``: two forward passes (no_grad, loss as a Python float after each, as the step does): the
   part of a step that is not zeroth-order work;
3. ``reference``: the baseline step (bench/baseline.py): 3 out-of-place perturbation passes with
   ``torch.manual_seed`` + ``torch.normal`` per tensor, 2 forwards, 1 update pass;
4. the fastmezo variants (``--variants``, default all, in this order), each ``MeZO.step``:
   ``inplace-rn`` / ``inplace-update`` / ``inplace-sr``: 3 fused in-place passes + 2 forwards,
   float16/bfloat16 stores rounded to nearest / stochastically in the update pass only (MeZO's
   default) / stochastically in every pass; ``exact-rn`` / ``exact-sr``: exact mode (hooks materialize
   W + eps z per group of modules right before it runs, ``--exact-group-bytes``; 2 out-of-place passes
   inside the forwards + 1 update pass). Exact mode is patched for its rows only and verified removed
   afterwards; its first step after patching (it checks the model's parameter reads) is never timed.

Reported per configuration: median step time over ``--reps`` steps after ``--warmup`` (CUDA events),
the ZO overhead = step - two forwards, the speed-ups baseline / variant of the step and of the overhead,
the overhead over the one-pass floor (2 * trainable parameter bytes / copy bandwidth measured in this
run; 3 passes a step for fastmezo, 4 for the baseline), the peak memory above inference
(``max_memory_allocated`` during the steps minus that during the plain forwards; n/a on the CPU), exact
mode's live copies and groups, and for the exact rows ``overhead_vs_inplace`` = exact overhead /
in-place overhead of the same rounding. ``--rounding nearest|update|stochastic`` is a shortcut for the
variants of that rounding; it also sets the rounding of the OPT-66B search (``--opt66b``,
bench/opt66b.py).

--smoke: tiny OPT ("opt-tiny"), tiny batches, few repetitions, output in a temporary directory; runs on
the CPU (fastmezo's automatic backend there). Times then mean nothing. Results:
``steps-<UTC time>-<gpu>.json`` and ``.csv`` (and ``opt66b-...csv``) in --out (default bench/results/),
rewritten after every model so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch  # (does not import triton)

from bench import bench_perturb, opt66b
from bench.common import (DTYPES, META_FIELDS, RESULTS, align, cpu_threads, default_copy_bandwidth, environment,
                          fastmezo_backend,
                          fmt, fmt_mib, free_memory, main_exit, parse_dtypes, parse_models, run_stem,
                          select_device, time_ms, write_csv, write_json)
from bench.models import ModelTooLarge, build_model, largest_tensor_bytes, make_batch, make_closure, param_bytes_of
from bench.shapes import numel, opt_param_shapes
from bench.step_variants import (EPS, FASTMEZO_SEED, BASELINE_SEED, LR, VARIANTS, WEIGHT_DECAY, BaselineStepper,
                                 fastmezo_variant, inplace_twin, parse_variants, rounding_of,
                                 variant_mode, variant_rounding, variants_of_rounding)

#: batch x tokens of the step benchmark, and the --quick / --smoke subsets.
STEP_CONFIGS = ((16, 256), (4, 256), (1, 128))
QUICK_CONFIGS = ((4, 256), (1, 128))
SMOKE_CONFIGS = ((2, 16), (1, 8))
DEFAULT_MODELS = ("opt-1.3b", "opt-13b")

STEP_FIELDS = ["model", "dtype", "batch", "tokens", "impl", "variant", "mode", "rounding", "ms_median", "ms_min",
               "ms_max", "reps", "forward2_ms", "overhead_ms", "passes", "floor_ms", "overhead_x_floor",
               "speedup_step_vs_reference", "speedup_overhead_vs_reference", "zo_share",
               "overhead_vs_inplace", "step_vs_inplace", "peak_bytes", "peak_extra_vs_inference_bytes",
               "exact_copy_peak_bytes", "largest_tensor_bytes", "exact_group_bytes", "exact_hooked_modules",
               "restore_checked", "loss", "backend",
               "n_tensors", "numel", "param_bytes", "bandwidth_gbps", *META_FIELDS]


# ---------------------------------------------------------------------------------------------------
# Measurements


def timed(fn, device: torch.device, warmup: int, reps: int) -> tuple[list[float], int | None]:
    """(milliseconds of each timed call, peak bytes allocated during all calls or None on the CPU).
    Peak statistics are reset first, so the peak is this function's alone (the weights included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_ms(fn, device, warmup, reps)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return times, peak


def _ratio(num, den):
    """num / den, or None when it means nothing (a missing or non-positive denominator)."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def bench_config(model, ref, batch: int, tokens: int, device: torch.device, floor_ms: float, warmup: int,
                 reps: int, log=print, label: str = "", variants=tuple(VARIANTS), backend: str | None = None,
                 optimizers: dict | None = None, exact_group_bytes: int | None = None) -> list[dict]:
    """Time two forwards, the baseline step and each fastmezo variant's step at one batch size, all on
    ``model``. Rows: forward, reference, then one per variant (``variants`` order).

    In-place variants use ``optimizers[variant]`` (made there if missing, so a caller can keep their step
    counts across configurations). Each exact variant patches the model for its own rows only: one
    untimed step (the read check of exact mode's first forward), then the timed ones, then the patch is
    removed and verify_restored checks the model before anything else runs on it."""
    if backend is None:
        backend = fastmezo_backend(device)
    optimizers = {} if optimizers is None else optimizers
    largest_tensor_bytes = max(p.numel() * p.element_size() for p in model.parameters())
    ids = make_batch(model.config.vocab_size, batch, tokens, device)
    closure = make_closure(model, ids)
    with torch.no_grad():
        loss0 = float(closure())
    if not math.isfinite(loss0):
        # MeZO would skip every step (no update pass) and the reference would write NaN into the weights:
        # the times would be of something else.
        raise RuntimeError(f"{label} {batch}x{tokens}: the random model's loss is {loss0}; not timing")

    @torch.no_grad()
    def forwards():
        float(closure())
        float(closure())

    fwd_times, fwd_peak = timed(forwards, device, warmup, reps)
    ref_times, ref_peak = timed(lambda: ref.step(closure), device, warmup, reps)
    for what, value in (("reference loss", ref.last_loss), ("reference projected gradient", ref.last_projected_grad)):
        if value is None or not math.isfinite(value):
            raise RuntimeError(f"{label} {batch}x{tokens}: {what} is {value}")
    plain = {"mode": None, "rounding": "nearest", "exact_copy_peak_bytes": None, "restore_checked": False,
             "largest_tensor_bytes": largest_tensor_bytes, "exact_hooked_modules": None, "exact_group_bytes": None}
    rows = [{"impl": "forward", "variant": "forward", **plain, "passes": 0, "times": fwd_times, "peak_bytes": fwd_peak,
             "loss": loss0},
            {"impl": "reference", "variant": "reference", **plain, "passes": 4, "times": ref_times,
             "peak_bytes": ref_peak, "loss": ref.last_loss}]
    for variant in variants:
        mode = variant_mode(variant)
        with fastmezo_variant(model, variant, backend, optimizers, group_bytes=exact_group_bytes) as (opt, exact):
            if exact is not None:
                opt.step(closure)   # untimed: exact mode's first forward runs under its read check
                exact.reset_peak()
            skipped_before = opt.skipped_steps
            times, peak = timed(lambda: opt.step(closure), device, warmup, reps)
            copy_peak = None if exact is None else exact.peak_bytes
            hooked = None if exact is None else len(exact.groups)
            group_bytes = None if exact is None else exact.group_bytes
        # (exact mode is removed here, and the model verified as before patching)
        if opt.skipped_steps != skipped_before:
            raise RuntimeError(f"{label} {batch}x{tokens}: {variant} skipped {opt.skipped_steps - skipped_before} "
                               "steps (non-finite loss): its times would lack the update pass")
        for what, value in (("loss", opt.loss_plus), ("projected gradient", opt.projected_grad)):
            if value is None or not math.isfinite(value):
                raise RuntimeError(f"{label} {batch}x{tokens}: {variant} {what} is {value}")
        rows.append({"impl": "fastmezo", "variant": variant, "mode": mode, "rounding": rounding_of(opt),
                     "passes": 3, "times": times, "peak_bytes": peak, "loss": opt.loss_plus,
                     "exact_copy_peak_bytes": copy_peak, "restore_checked": exact is not None,
                     "largest_tensor_bytes": largest_tensor_bytes, "exact_hooked_modules": hooked,
                     "exact_group_bytes": group_bytes})

    fwd_ms = statistics.median(fwd_times)
    ref_ms = statistics.median(ref_times)
    ref_overhead = ref_ms - fwd_ms
    for r in rows:
        times = r.pop("times")
        r["ms_median"] = statistics.median(times)
        overhead = None if r["impl"] == "forward" else r["ms_median"] - fwd_ms
        r.update({"batch": batch, "tokens": tokens, "ms_min": min(times), "ms_max": max(times), "reps": len(times),
                  "forward2_ms": fwd_ms, "overhead_ms": overhead, "floor_ms": floor_ms,
                  "overhead_x_floor": None if overhead is None else overhead / floor_ms,
                  "speedup_step_vs_reference": None if overhead is None else ref_ms / r["ms_median"],
                  "speedup_overhead_vs_reference": None if overhead is None else _ratio(ref_overhead, overhead),
                  "zo_share": None if overhead is None else overhead / r["ms_median"],
                  "peak_extra_vs_inference_bytes": None if r["peak_bytes"] is None or fwd_peak is None
                  else r["peak_bytes"] - fwd_peak})
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        twin = by_variant.get(inplace_twin(r["variant"])) if r["mode"] == "exact" else None
        r["overhead_vs_inplace"] = None if twin is None else _ratio(r["overhead_ms"], twin["overhead_ms"])
        r["step_vs_inplace"] = None if twin is None else r["ms_median"] / twin["ms_median"]
    log(f"[{label}] {batch}x{tokens}: 2 forwards {fwd_ms:.2f} ms | reference step {ref_ms:.2f} ms "
        f"(overhead {ref_overhead:.2f}, extra memory {fmt_mib(rows[1]['peak_extra_vs_inference_bytes'])})")
    for r in rows[2:]:
        versus = "" if r["mode"] != "exact" else \
            (f" | overhead / {inplace_twin(r['variant'])}'s {fmt(r['overhead_vs_inplace'], '.2f')}x | perturbed "
             f"copies alive at most {fmt_mib(r['exact_copy_peak_bytes'])} (largest weight {fmt_mib(largest_tensor_bytes)}; "
             f"{r['exact_hooked_modules']} hooked modules, groups of at most {fmt_mib(r['exact_group_bytes'])})")
        log(f"[{label}] {batch}x{tokens}:   {r['variant']:<10} step {r['ms_median']:.2f} ms (overhead "
            f"{r['overhead_ms']:.2f}) | step speed-up {r['speedup_step_vs_reference']:.2f}x, overhead speed-up "
            f"{fmt(r['speedup_overhead_vs_reference'], '.2f')}x | extra memory "
            f"{fmt_mib(r['peak_extra_vs_inference_bytes'])}{versus}")
    return rows


def bench_model(name: str, dtype_name: str, device: torch.device, configs, bandwidth: float, warmup: int,
                reps: int, backend: str, log=print, rounding: str | None = None,
                variants=None, exact_group_bytes: int | None = None) -> tuple[dict, list[dict]]:
    """Build one model in one dtype and time every batch configuration with the baseline and each
    variant (default: those of ``rounding``, all four when it is None). Returns (summary, rows); a model
    that does not fit is skipped."""
    variants = list(variants) if variants is not None else variants_of_rounding(rounding)
    dtype = DTYPES[dtype_name]
    shapes = opt_param_shapes(name)
    pbytes = param_bytes_of(name, dtype)
    largest = largest_tensor_bytes(name, dtype)
    floor_ms = 2 * pbytes / bandwidth * 1e3
    label = f"{name} {dtype_name}"
    summary = {"model": name, "dtype": dtype_name, "n_tensors": len(shapes), "numel": numel(shapes),
               "param_bytes": pbytes, "largest_tensor_bytes": largest, "floor_ms": floor_ms, "variants": variants}
    try:
        t0 = time.perf_counter()
        model = build_model(name, dtype, device, log=log)
        summary["build_s"] = time.perf_counter() - t0
    except ModelTooLarge as exc:
        summary["skipped"] = str(exc)
        log(f"[{label}] skipped: {exc}")
        return summary, []
    summary["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    rows = []
    ref = optimizers = None
    try:
        n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
        if device.type == "cuda":
            summary["weights_allocated_bytes"] = torch.cuda.memory_allocated(device)
        optimizers = {}
        ref = BaselineStepper(model)
        summary["rounding"] = sorted({variant_rounding(v) for v in variants})
        for batch, tokens in configs:
            for r in bench_config(model, ref, batch, tokens, device, floor_ms, warmup, reps, log, label,
                                  variants=variants, backend=backend, optimizers=optimizers,
                                  exact_group_bytes=exact_group_bytes):
                r.update({"model": name, "dtype": dtype_name, "backend": backend, "n_tensors": n_tensors,
                          "numel": summary["numel"], "param_bytes": pbytes, "largest_tensor_bytes": largest,
                          "bandwidth_gbps": bandwidth / 1e9})
                rows.append(r)
    finally:
        # The optimizers, the closures and the exception traceback (if any) hold the parameters: drop the
        # model before the next one is built.
        model = ref = optimizers = None  # noqa: F841
        free_memory(device)
    return summary, rows


# ---------------------------------------------------------------------------------------------------
# Output


def output_paths(out_dir: Path, env: dict) -> dict:
    """The run's file names: steps-<UTC time>-<gpu>.{json,csv} and opt66b-<same>.csv."""
    stem = run_stem("steps", env)
    return {"json": out_dir / f"{stem}.json", "csv": out_dir / f"{stem}.csv",
            "opt66b_csv": out_dir / f"opt66b{stem[len('steps'):]}.csv"}


def write_results(paths: dict, result: dict) -> None:
    """(Re)write the JSON, the step CSV and, when there are OPT-66B rows, their CSV; every CSV row
    carries the run's device, versions, commit and date."""
    write_json(paths["json"], result)
    meta = {k: result["environment"][k] for k in META_FIELDS}
    write_csv(paths["csv"], STEP_FIELDS, result["rows"], meta)
    if result.get("opt66b"):
        write_csv(paths["opt66b_csv"], opt66b.FIELDS + list(META_FIELDS), result["opt66b"]["rows"], meta)


def format_table(result: dict) -> str:
    """The step rows (and the OPT-66B search) as aligned text."""
    env = result["environment"]
    lines = [f"device {env['gpu']} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} "
             f"transformers {env['transformers']} | commit {env['commit'][:12]} | {env['date']}",
             f"copy bandwidth {result['bandwidth']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; floor = 2 * "
             "trainable parameter bytes / bandwidth; fastmezo backend " + result["settings"]["backend"]
             + ", variants " + ", ".join(result["settings"].get("variants") or ["-"])]
    for s in result["models"]:
        line = (f"  {s['model']} {s['dtype']}: {s['numel']:,} parameters, {s['param_bytes'] / 1e9:.3f} GB, "
                f"floor {s['floor_ms']:.3f} ms")
        lines.append(line + (f"  SKIPPED ({s['skipped']})" if "skipped" in s else ""))
    header = ["model", "dtype", "batch", "impl", "step ms", "overhead ms", "x floor", "step speedup",
              "overhead speedup", "ZO share", "extra MiB", "exact/inplace"]
    body = []
    for r in result["rows"]:
        body.append([r["model"], r["dtype"], f"{r['batch']}x{r['tokens']}", r.get("variant") or r["impl"],
                     fmt(r["ms_median"], ".2f"), fmt(r["overhead_ms"], ".2f"), fmt(r["overhead_x_floor"], ".2f"),
                     fmt(r["speedup_step_vs_reference"], ".2f"), fmt(r["speedup_overhead_vs_reference"], ".2f"),
                     fmt(None if r["zo_share"] is None else 100 * r["zo_share"], ".0f") + ("%" if r["zo_share"] is not None else ""),
                     fmt(None if r["peak_extra_vs_inference_bytes"] is None
                          else r["peak_extra_vs_inference_bytes"] / 2**20, ".0f"),
                     fmt(r.get("overhead_vs_inplace"), ".2f") if r.get("mode") == "exact" else ""])
    lines += ["", *align(header, body, numeric_from=4),
              "forward = two forward passes; overhead = step - forward; x floor = overhead / one-pass floor "
              "(ideal: 3 passes fastmezo, 4 reference); extra = peak above a plain forward; exact/inplace = "
              "overhead of exact mode / overhead in place, same rounding (target <= 1.3)"]
    big = result.get("opt66b")
    if big:
        s = big["summary"]
        lines += ["", f"{s['model']} {s['dtype']}, {s['tokens']} tokens: "
                  + (f"SKIPPED ({s['skipped']})" if "skipped" in s else "largest batch "
                     + ", ".join(f"{k} {v if v is not None else 'none'}" for k, v in big["largest"].items()))]
        body = [[f"{r['batch']}x{r['tokens']}", r["impl"], r["status"], fmt(r.get("ms"), ".1f"),
                 fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30, ".2f"),
                 fmt(None if r.get("peak_extra_vs_inference_bytes") is None
                      else r["peak_extra_vs_inference_bytes"] / 2**20, ".0f")] for r in big["rows"]]
        if body:
            lines += align(["batch", "impl", "status", "ms", "peak GiB", "extra MiB"], body, numeric_from=3)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'16x256,4x256' -> [(16, 256), (4, 256)]."""
    configs = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        b, _, t = part.partition("x")
        if not (b.isdigit() and t.isdigit() and int(b) > 0 and int(t) > 0):
            raise ValueError(f"bad batch configuration {part!r}: expected BATCHxTOKENS, e.g. 16x256")
        configs.append((int(b), int(t)))
    return configs


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options bench_steps.py and run_all.py share (run_all adds --models/--dtypes/--quick/--smoke)."""
    parser.add_argument("--configs", default=None,
                        help="batch x tokens, comma-separated (default 16x256,4x256,1x128; --quick 4x256,1x128; "
                             "--smoke 2x16,1x8)")
    parser.add_argument("--step-warmup", "--warmup", dest="step_warmup", type=int, default=None,
                        help="untimed steps per measurement (default 2; 1 with --smoke)")
    parser.add_argument("--step-reps", "--reps", dest="step_reps", type=int, default=None,
                        help="timed steps per measurement, median reported (default 5; 3 with --quick, 2 with --smoke)")
    parser.add_argument("--backend", default=None,
                        help="fastmezo backend: triton, native or the torch oracle (default: automatic, triton on "
                             "CUDA; the choice is recorded; fastmezo says why a named one cannot run)")
    parser.add_argument("--variants", default=None,
                        help="fastmezo variants timed next to the reference, comma-separated: inplace-rn, "
                             "inplace-update, inplace-sr, exact-rn, exact-sr (in place or exact mode; "
                             "float16/bfloat16 stores rounded to nearest, stochastically in the update pass "
                             "(the default), or in every pass), or 'all' (default: all)")
    parser.add_argument("--exact-group-bytes", type=int, default=None,
                        help="exact mode's group budget (fastmezo.patch(group_bytes=...)): the most bytes of "
                             "perturbed copies one hooked module makes; 0 = one hooked module per module owning "
                             "a trained parameter (default: fastmezo's, the largest trained tensor, >= 16 MiB)")
    parser.add_argument("--rounding", default=None, choices=("stochastic", "update", "nearest"),
                        help="shortcut for the variants of one rounding: nearest = inplace-rn,exact-rn, "
                             "update = inplace-update, stochastic = inplace-sr,exact-sr; also the rounding of "
                             "the --opt66b search (default there: MeZO's own, update). The reference always "
                             "rounds to nearest")
    parser.add_argument("--opt66b", action="store_true",
                        help="also search the largest batch OPT-66B (fp16, one GPU) takes a step with, for "
                             "fastmezo and the reference (a few minutes)")
    parser.add_argument("--opt66b-tokens", type=int, default=256, help="tokens per sequence in the search (default 256)")
    parser.add_argument("--opt66b-max-batch", type=int, default=128, help="largest batch tried (default 128)")
    parser.add_argument("--opt66b-dtype", default="float16", choices=tuple(DTYPES), help="default float16")


def finish_args(args, parser) -> argparse.Namespace:
    """Defaults that depend on --quick / --smoke, and validation."""
    try:
        args.configs = parse_configs(args.configs) if args.configs else list(
            SMOKE_CONFIGS if args.smoke else QUICK_CONFIGS if args.quick else STEP_CONFIGS)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        variants = parse_variants(args.variants) if args.variants else None
    except ValueError as exc:
        parser.error(str(exc))
    if variants is not None and args.rounding is not None:
        wrong = [v for v in variants if variant_rounding(v) != args.rounding]
        if wrong:
            parser.error(f"--rounding {args.rounding} contradicts --variants {','.join(variants)} ({wrong[0]}); "
                         "give --variants alone")
    args.variants = variants if variants is not None else variants_of_rounding(args.rounding)
    if args.step_warmup is None:
        args.step_warmup = 1 if args.smoke else 2
    if args.step_reps is None:
        args.step_reps = 2 if args.smoke else 3 if args.quick else 5
    if args.step_warmup < 0 or args.step_reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    if args.exact_group_bytes is not None and args.exact_group_bytes < 0:
        parser.error("--exact-group-bytes must be >= 0")
    if args.opt66b_tokens < 1 or args.opt66b_max_batch < 1:
        parser.error("--opt66b-tokens and --opt66b-max-batch must be >= 1")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated: opt-125m, opt-1.3b, opt-13b, opt-66b, opt-tiny, or 'none' "
                             "(default opt-1.3b,opt-13b; --quick opt-1.3b; --smoke opt-tiny)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: float16, bfloat16, float32 (default float16; float32 with "
                             "--smoke on the CPU)")
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results/; a temporary directory with --smoke)")
    parser.add_argument("--quick", action="store_true", help="opt-1.3b, 2 batch configurations, 3 timed steps")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny OPT, tiny batches: checks that the script runs (on the CPU without a GPU)")
    add_step_arguments(parser)
    args = parser.parse_args(argv)
    args.models = parse_models(args.models or default_models(args.smoke, args.quick), parser)
    args.dtypes = parse_dtypes(args.dtypes or default_dtypes(args.smoke), parser)
    return finish_args(args, parser)


def default_models(smoke: bool, quick: bool) -> str:
    return "opt-tiny" if smoke else "opt-1.3b" if quick else ",".join(DEFAULT_MODELS)


def default_dtypes(smoke: bool) -> str:
    return "float32" if (smoke and not torch.cuda.is_available()) else "float16"


def run(args, device: torch.device, env: dict, out_dir: Path, bandwidth: dict | None = None, log=print) -> dict:
    """The step benchmark with parsed arguments (shared by main and run_all). ``bandwidth``: a copy
    bandwidth record measured earlier in the same run (common.copy_bandwidth), else measured here."""
    with cpu_threads(device, args.smoke):
        return _run(args, device, env, out_dir, bandwidth, log)


def _run(args, device, env, out_dir, bandwidth, log) -> dict:
    backend = fastmezo_backend(device, args.backend)
    log(f"fastmezo step benchmark on {env['gpu']} ({device}); torch {env['torch']}, triton {env['triton']}, "
        f"cuda {env['cuda']}, transformers {env['transformers']}, commit {env['commit'][:12]}; fastmezo backend {backend}")

    if bandwidth is None:
        bandwidth = default_copy_bandwidth(device, args.smoke)
    bw = bandwidth["bandwidth_bytes_per_s"]
    log(f"copy bandwidth: {bw / 1e9:.1f} GB/s (read + write)")

    all_dtypes = sorted(set(args.dtypes) | ({args.opt66b_dtype} if args.opt66b else set()))
    checks = bench_perturb.check_kernels(device, [DTYPES[d] for d in all_dtypes], (1 << 16) if args.smoke else (1 << 20),
                              backend)
    log(f"kernel check passed ({backend}): {len(checks)} comparisons with the torch oracle")

    result = {
        "benchmark": "steps",
        "environment": env,
        "settings": {"smoke": args.smoke, "quick": args.quick, "models": args.models, "dtypes": args.dtypes,
                     "configs": [f"{b}x{t}" for b, t in args.configs], "warmup": args.step_warmup,
                     "reps": args.step_reps, "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
                     "backend": backend, "variants": list(args.variants),
                     "rounding": args.rounding or "per variant", "eps": EPS, "lr": LR, "weight_decay": WEIGHT_DECAY,
                     "fastmezo_seed": FASTMEZO_SEED, "reference_seed": BASELINE_SEED, "opt66b": args.opt66b,
                     "exact_group_bytes": args.exact_group_bytes},
        "bandwidth": bandwidth,
        "checks": checks,
        "models": [],
        "rows": [],
    }
    paths = output_paths(out_dir, env)
    for name in args.models:
        for dtype_name in args.dtypes:
            summary, rows = bench_model(name, dtype_name, device, args.configs, bw, args.step_warmup,
                                                 args.step_reps, backend, log, variants=args.variants,
                                                 exact_group_bytes=args.exact_group_bytes)
            result["models"].append(summary)
            meta = {k: env[k] for k in META_FIELDS}
            result["rows"] += [{**r, **meta} for r in rows]
            write_results(paths, result)  # after every model: a run cut short keeps what it measured
    if args.opt66b:
        result["opt66b"] = opt66b.bench_opt66b(device, args.opt66b_dtype, args.opt66b_tokens,
                                               args.opt66b_max_batch, backend, log, rounding=args.rounding)
    write_results(paths, result)
    result["files"] = {k: str(v) for k, v in paths.items() if k != "opt66b_csv" or result.get("opt66b")}
    log(f"wrote {paths['json']}\nwrote {paths['csv']}" + (f"\nwrote {paths['opt66b_csv']}" if args.opt66b else "") + "\n")
    log(format_table(result))
    return result


def main(argv=None) -> dict:
    """Run the step benchmark; returns the result dict (also written to --out)."""
    args = parse_args(argv)
    opt66b.prepare_allocator(args.opt66b)
    device = select_device(args.smoke, "bench.bench_steps")
    env = environment(device)
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="fastmezo-steps-smoke-")) if args.smoke else RESULTS)
    return run(args, device, env, out_dir, log=lambda *a: print(*a, flush=True))


if __name__ == "__main__":
    main_exit(main)
