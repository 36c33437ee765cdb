"""Benchmark of the MeZO parameter passes: fastmezo's fused Triton kernels against the reference way.

    python -m bench.bench_perturb [--models opt-1.3b,opt-13b] [--dtypes float16,bfloat16]
                                   [--out DIR] [--warmup N] [--reps N] [--smoke]

For each model's parameter shapes (bench/shapes.py, random weights, no downloads) and each dtype, on
one GPU:

1. measures the device's copy bandwidth (one large tensor copy: bytes read + written / time) and
   computes the one-pass floor = 2 * parameter bytes / bandwidth: the time to read and write every
   parameter byte once, which is the least any in-place pass over the parameters can take;
2. before timing anything, checks that the Triton kernels agree with the torch oracle
   (fastmezo.oracle) on a sample, and aborts if they do not;
3. times (CUDA events, warm-up then several repetitions, median) one pass of
     fastmezo perturb_             (Gaussian and Rademacher noise)
     fastmezo restore_and_update_  (Gaussian and Rademacher noise)
     reference perturb and update  (bench/baseline.py: torch.manual_seed + torch.normal,
                                    out of place, as the MeZO paper's trainer does)
   and the peak memory each needs above the parameters (max_memory_allocated - allocated before);
4. derives the ZO overhead of one step: fastmezo 2 perturb + 1 restore_and_update = 3 passes, the
   reference 3 perturb + 1 update = 4 passes;
5. writes a JSON and a CSV (one row per measurement) to --out (default bench/results/) with the GPU
   name, torch/triton/CUDA versions, git commit and date, and prints an aligned table last.

Speed-up vs reference: perturb is compared with the reference perturb pass; restore_and_update, which
fuses two reference passes, with reference perturb + reference update; a step with a reference step.

Small models (OPT-1.3B: 388 tensors) can be bound by launch and Python overhead rather than memory;
the us_per_tensor column shows it.

--smoke: a quick self-test that runs anywhere, a GPU or not: tiny OPT-shaped tensors ("opt-tiny"),
few repetitions, results in a temporary directory. Without CUDA it runs on the CPU through the Triton
interpreter (TRITON_INTERPRET=1, set here before triton is imported if not set already); the times
then mean nothing, and memory is not measured.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch  # (does not import triton)

from bench.baseline import NO_DECAY, baseline_perturb, baseline_update
from bench.common import (BASELINE_SEED, DTYPES, FASTMEZO_SEED, META_FIELDS, RESULTS, CheckFailed,
                          default_copy_bandwidth, environment, fmt, free_memory, main_exit, parse_dtypes, parse_models, peak_extra_bytes, run_stem,
                          select_device, time_ms, triton_interpreted, ulp, write_csv, write_json)
from bench.shapes import numel, opt_param_shapes

# Values of the passes. They do not change the speed; they keep the weights sane over repetitions.
SEED = FASTMEZO_SEED
TORCH_SEED = BASELINE_SEED
EPS = 1e-3
LR = 1e-6
PROJECTED_GRAD = 1.0
WEIGHT_DECAY = 0.0             # the paper's default; bias / layer-norm tensors skip it anyway

# The kernel check: a sample of this many elements at these global offsets (the second one needs the
# high word of the 64-bit Philox counter), key and scale.
CHECK_OFFSETS = (0, (1 << 32) + 12345)
CHECK_KEY = 12345
CHECK_ALPHA = 0.5
NORMAL_ATOL = 1e-5             # |z_triton - z_oracle| <= NORMAL_ATOL * (1 + |z|)  (docs/noise.md)

CSV_FIELDS = ["model", "dtype", "impl", "op", "noise", "passes", "ms_median", "ms_min", "ms_max", "reps",
              "floor_ms", "ratio_to_floor", "speedup_vs_reference", "us_per_tensor", "peak_extra_bytes",
              "n_tensors", "numel", "param_bytes", "bandwidth_gbps", "derived", *META_FIELDS]


# ---------------------------------------------------------------------------------------------------
# The kernel check


def check_kernels(device: torch.device, dtypes, n: int, backend: str = "triton") -> list[dict]:
    """Compare the fast kernels of ``backend`` with the torch oracle (fastmezo.oracle) before timing them.

    * z itself: ``make_noise(..., backend=backend)`` against ``fastmezo.oracle.noise`` at two
      offsets: Rademacher must match exactly, Gaussian within NORMAL_ATOL * (1 + |z|).
    * the perturb pass in every dtype: ``perturb_`` on a parameter-like tensor against
      ``pass_with_z(x, 1, alpha, z_oracle)``: Rademacher exact, Gaussian within one unit in the
      last place of the dtype (or the Gaussian tolerance times alpha, if larger). Exception: under
      the Triton interpreter (CPU), bfloat16 Rademacher results may be one unit off, because the
      interpreter (triton 3.9) casts float32 to bfloat16 by truncation where the GPU rounds to nearest.

    Returns one record per comparison; raises CheckFailed, with every failure listed, if any fails.
    """
    from fastmezo import functional as F
    from fastmezo import oracle as R

    interpreted = triton_interpreted()
    records, failures = [], []
    for noise in ("gaussian", "rademacher"):
        for offset in CHECK_OFFSETS:
            fast = F.make_noise(n, SEED, CHECK_KEY, noise=noise, offset=offset, device=device,
                                backend=backend)
            ref = R.noise(n, SEED, CHECK_KEY, noise, offset=offset, device=device)
            err = (fast - ref).abs()
            if noise == "rademacher":
                ok = torch.equal(fast, ref)
            else:
                ok = bool((err <= NORMAL_ATOL * (1 + ref.abs())).all())
            records.append({"what": "make_noise", "noise": noise, "offset": offset, "dtype": "float32",
                            "numel": n, "max_abs_diff": err.max().item(), "ok": ok})
            if not ok:
                failures.append(f"make_noise {noise} at offset {offset}: max |diff| {err.max().item():.3g}")
        ref = R.noise(n, SEED, CHECK_KEY, noise, device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        for dtype in dtypes:
            x = (torch.randn(n, generator=gen, device=device) * 0.02).to(dtype)
            y = x.clone()
            F.perturb_([y], SEED, CHECK_ALPHA, keys=[CHECK_KEY], noise=noise, backend=backend)
            expect = R.pass_with_z(x, 1.0, CHECK_ALPHA, ref)
            err = (y.float() - expect.float()).abs()
            if noise == "rademacher" and not (interpreted and dtype == torch.bfloat16):
                ok = torch.equal(y, expect)
            elif noise == "rademacher":
                # Triton's interpreter casts float32 -> bfloat16 by truncation (toward zero), the GPU
                # rounds to nearest even: allow one unit in the last place there.
                ok = bool((err <= ulp(expect)).all())
            else:
                tol = torch.maximum(ulp(expect), CHECK_ALPHA * NORMAL_ATOL * (1 + ref.abs()))
                ok = bool((err <= tol).all())
            records.append({"what": "perturb_", "noise": noise, "offset": 0, "dtype": str(dtype).split(".")[-1],
                            "numel": n, "max_abs_diff": err.max().item(), "ok": ok})
            if not ok:
                failures.append(f"perturb_ {noise} {dtype}: max |diff| {err.max().item():.3g}")
    free_memory(device)
    if failures:
        raise CheckFailed("fastmezo's Triton kernels disagree with the torch oracle; not timing them:\n  "
                          + "\n  ".join(failures))
    return records


# ---------------------------------------------------------------------------------------------------
# The benchmark of one (model, dtype)


def allocate(shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Random parameters (N(0, 0.02)) of the given shapes, in dtype, on device."""
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02) for _, shape in shapes]


def _alternating(fn):
    """A callable that calls fn(sign) with sign +1, -1, +1, ... so repeated perturbations cancel."""
    state = {"sign": 1.0}

    def call():
        fn(state["sign"])
        state["sign"] = -state["sign"]
    return call


def bench_model(model: str, shapes, dtype_name: str, device: torch.device, bandwidth: float,
                warmup: int, reps: int, log=print, backend: str = "triton") -> tuple[dict, list[dict]]:
    """Time every pass over one model's parameters in one dtype. Returns (summary, rows)."""
    from fastmezo import functional as F

    dtype = DTYPES[dtype_name]
    names = [name for name, _ in shapes]
    n_elems = numel(shapes)
    param_bytes = n_elems * torch.tensor([], dtype=dtype).element_size()
    floor_ms = 2 * param_bytes / bandwidth * 1e3
    summary = {"model": model, "dtype": dtype_name, "n_tensors": len(shapes), "numel": n_elems,
               "param_bytes": param_bytes, "floor_ms": floor_ms}

    if device.type == "cuda":
        largest = max(math.prod(s) for _, s in shapes) * torch.tensor([], dtype=dtype).element_size()
        need = param_bytes + 4 * largest + (1 << 30)  # the reference's temporaries, and some slack
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            summary["skipped"] = (f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            log(f"[{model} {dtype_name}] skipped: {summary['skipped']}")
            return summary, []

    params = allocate(shapes, dtype, device)
    wd = [0.0 if any(tag in name for tag in NO_DECAY) else WEIGHT_DECAY for name in names]

    cases = [
        ("fastmezo", "perturb", "gaussian", _alternating(
            lambda s: F.perturb_(params, SEED, s * EPS, noise="gaussian", backend=backend))),
        ("fastmezo", "perturb", "rademacher", _alternating(
            lambda s: F.perturb_(params, SEED, s * EPS, noise="rademacher", backend=backend))),
        ("fastmezo", "restore_and_update", "gaussian", lambda: F.restore_and_update_(
            params, SEED, EPS, LR, PROJECTED_GRAD, weight_decay=wd, noise="gaussian", backend=backend)),
        ("fastmezo", "restore_and_update", "rademacher", lambda: F.restore_and_update_(
            params, SEED, EPS, LR, PROJECTED_GRAD, weight_decay=wd, noise="rademacher", backend=backend)),
        ("reference", "perturb", "gaussian", _alternating(
            lambda s: baseline_perturb(params, TORCH_SEED, s, EPS))),
        ("reference", "update", "gaussian", lambda: baseline_update(
            params, TORCH_SEED, LR, PROJECTED_GRAD, WEIGHT_DECAY, names)),
    ]
    rows = []
    for impl, op, noise, fn in cases:
        times = time_ms(fn, device, warmup, reps)
        peak = peak_extra_bytes(fn, device)
        ms = statistics.median(times)
        rows.append({"impl": impl, "op": op, "noise": noise, "passes": 1, "ms_median": ms,
                     "ms_min": min(times), "ms_max": max(times), "reps": reps, "peak_extra_bytes": peak,
                     "derived": False})
        log(f"[{model} {dtype_name}] {impl} {op} {noise}: {ms:.3f} ms (floor {floor_ms:.3f} ms)")
    del params, cases, fn  # the closures hold the parameters
    free_memory(device)

    # Speed-ups, and the ZO overhead of a whole step (derived from the passes above).
    t = {(r["impl"], r["op"], r["noise"]): r for r in rows}
    ref_perturb, ref_update = t["reference", "perturb", "gaussian"], t["reference", "update", "gaussian"]
    ref_step_ms = 3 * ref_perturb["ms_median"] + ref_update["ms_median"]
    for r in rows:
        if r["impl"] == "reference":
            r["speedup_vs_reference"] = 1.0
        elif r["op"] == "perturb":
            r["speedup_vs_reference"] = ref_perturb["ms_median"] / r["ms_median"]
        else:  # restore_and_update replaces the reference's restore (a perturb pass) and its update
            r["speedup_vs_reference"] = (ref_perturb["ms_median"] + ref_update["ms_median"]) / r["ms_median"]
    steps = [{"impl": "reference", "op": "step", "noise": "gaussian", "passes": 4, "ms_median": ref_step_ms,
              "peak_extra_bytes": _max_peak([ref_perturb, ref_update]), "speedup_vs_reference": 1.0}]
    for noise in ("gaussian", "rademacher"):
        p, u = t["fastmezo", "perturb", noise], t["fastmezo", "restore_and_update", noise]
        ms = 2 * p["ms_median"] + u["ms_median"]
        steps.append({"impl": "fastmezo", "op": "step", "noise": noise, "passes": 3, "ms_median": ms,
                      "peak_extra_bytes": _max_peak([p, u]), "speedup_vs_reference": ref_step_ms / ms})
    for s in steps:
        s.update({"ms_min": None, "ms_max": None, "reps": None, "derived": True})
    rows += steps

    for r in rows:
        r.update({"model": model, "dtype": dtype_name, "floor_ms": floor_ms,
                  "ratio_to_floor": r["ms_median"] / floor_ms,
                  "us_per_tensor": r["ms_median"] * 1e3 / (r["passes"] * len(shapes)),
                  "n_tensors": len(shapes), "numel": n_elems, "param_bytes": param_bytes,
                  "bandwidth_gbps": bandwidth / 1e9})
    return summary, rows


def _max_peak(rows):
    peaks = [r["peak_extra_bytes"] for r in rows]
    return None if any(p is None for p in peaks) else max(peaks)


# ---------------------------------------------------------------------------------------------------
# Output


def write_results(out_dir: Path, result: dict) -> tuple[Path, Path]:
    """Write the whole result as JSON and the rows as CSV (with run metadata on every row)."""
    env = result["environment"]
    base = out_dir / run_stem("perturb", env)
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    write_json(json_path, result)
    write_csv(csv_path, CSV_FIELDS, result["rows"], {k: env[k] for k in META_FIELDS})
    return json_path, csv_path


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.3f} MB"


def format_table(result: dict) -> str:
    """The rows as an aligned text table, preceded by the device, bandwidth and floor lines."""
    env, bw = result["environment"], result["bandwidth"]
    lines = [f"device {env['gpu']} | torch {env['torch']} triton {env['triton']} cuda {env['cuda']} "
             f"| commit {env['commit'][:12]} | {env['date']}",
             f"copy bandwidth {bw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (read + write); "
             "floor = 2 * parameter bytes / bandwidth"]
    for s in result["models"]:
        line = (f"  {s['model']} {s['dtype']}: {s['n_tensors']} tensors, {s['numel']:,} parameters, "
                f"{_fmt_bytes(s['param_bytes'])}, floor {s['floor_ms']:.3f} ms")
        lines.append(line + (f"  SKIPPED ({s['skipped']})" if "skipped" in s else ""))
    header = ["model", "dtype", "impl", "op", "noise", "passes", "ms", "x floor", "speedup", "extra MB",
              "us/tensor"]
    body = []
    for r in result["rows"]:
        body.append([r["model"], r["dtype"], r["impl"], r["op"] + ("*" if r["derived"] else ""), r["noise"],
                     str(r["passes"]), fmt(r["ms_median"], ".3f", "-"), fmt(r["ratio_to_floor"], ".2f", "-"),
                     fmt(r["speedup_vs_reference"], ".2f", "-"),
                     fmt(None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20, ".1f", "-"),
                     fmt(r["us_per_tensor"], ".1f", "-")])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    numeric = set(range(5, len(header)))

    def fmt_row(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines += ["", fmt_row(header), fmt_row(["-" * w for w in widths])] + [fmt_row(b) for b in body]
    lines.append("* step = derived ZO overhead of one step (fastmezo: 2 perturb + restore_and_update; "
                 "reference: 3 perturb + update)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help="comma-separated: opt-125m, opt-1.3b, opt-13b, opt-66b, opt-tiny "
                             "(default opt-1.3b,opt-13b; opt-tiny with --smoke)")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated: float16, bfloat16, float32")
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results/; a new temporary directory with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; with --smoke 1 on a GPU, 0 on the CPU, "
                             "where the interpreter compiles nothing)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 10; 1 with --smoke)")
    parser.add_argument("--backend", default="triton", choices=("triton", "native"),
                        help="the fastmezo backend timed (default triton). An explicit choice: the "
                             "FASTMEZO_BACKEND environment variable does not change what this script times")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few repetitions, temporary output: checks that the script runs "
                             "(on the CPU through the Triton interpreter when there is no GPU)")
    args = parser.parse_args(argv)
    args.models = parse_models(args.models or ("opt-tiny" if args.smoke else "opt-1.3b,opt-13b"), parser)
    args.dtypes = parse_dtypes(args.dtypes, parser)
    if args.reps is None:
        args.reps = 1 if args.smoke else 10
    if (args.warmup is not None and args.warmup < 0) or args.reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    return args


def main(argv=None) -> dict:
    """Run the benchmark; returns the result dict (also written to --out)."""
    args = parse_args(argv)
    device = select_device(args.smoke, "bench.bench_perturb")
    if args.warmup is None:
        args.warmup = 3 if not args.smoke else (1 if device.type == "cuda" else 0)

    env = environment(device)
    where = f"{env['gpu']} ({device})" if device.type == "cuda" else f"{env['gpu']}, Triton interpreter"
    print(f"fastmezo perturb benchmark on {where}; torch {env['torch']}, "
          f"triton {env['triton']}, cuda {env['cuda']}, commit {env['commit'][:12]}")

    check_numel = (1 << 16) if args.smoke else (1 << 20)
    checks = check_kernels(device, [DTYPES[d] for d in args.dtypes], check_numel, args.backend)
    worst_z = max(c["max_abs_diff"] for c in checks if c["what"] == "make_noise")
    print(f"kernel check passed: {len(checks)} comparisons with the torch oracle on {check_numel:,} elements "
          f"(z: max |diff| {worst_z:.3g}; perturb_ in {', '.join(args.dtypes)}: within tolerance)")

    bandwidth = default_copy_bandwidth(device, args.smoke)
    bw = bandwidth["bandwidth_bytes_per_s"]
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s ({bandwidth['copy_bytes'] >> 20} MiB copied, read + write)")

    models, rows = [], []
    for model in args.models:
        shapes = opt_param_shapes(model)
        for dtype_name in args.dtypes:
            summary, model_rows = bench_model(model, shapes, dtype_name, device, bw, args.warmup, args.reps,
                                              backend=args.backend)
            models.append(summary)
            rows += model_rows

    result = {
        "benchmark": "perturb",
        "environment": env,
        "settings": {"smoke": args.smoke, "models": args.models, "dtypes": args.dtypes,
                     "warmup": args.warmup, "reps": args.reps, "timer": "cuda events" if device.type == "cuda"
                     else "time.perf_counter", "backend": args.backend, "seed": SEED, "eps": EPS, "lr": LR,
                     "projected_grad": PROJECTED_GRAD, "weight_decay": WEIGHT_DECAY},
        "bandwidth": bandwidth,
        "checks": checks,
        "models": models,
        "rows": rows,
    }
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="fastmezo-bench-smoke-")) if args.smoke else RESULTS)
    json_path, csv_path = write_results(out_dir, result)
    print(f"wrote {json_path}\nwrote {csv_path}\n")
    print(format_table(result))
    return result


if __name__ == "__main__":
    main_exit(main)
