#!/usr/bin/env python
"""Benchmark of the MeZO parameter passes: fastmezo's fused Triton kernels against the reference way.

    python bench/bench_perturb.py [--models opt-1.3b,opt-13b] [--dtypes float16,bfloat16]
                                  [--out DIR] [--warmup N] [--reps N] [--smoke]

For each model's parameter shapes (bench/shapes.py, random weights, no downloads) and each dtype, on
one GPU:

1. measures the device's copy bandwidth (one large tensor copy: bytes read + written / time) and
   computes the one-pass floor = 2 * parameter bytes / bandwidth: the time to read and write every
   parameter byte once, which is the least any in-place pass over the parameters can take;
2. before timing anything, checks that the Triton kernels agree with the torch oracle
   (fastmezo.reference) on a sample, and aborts if they do not;
3. times (CUDA events, warm-up then several repetitions, median) one pass of
     fastmezo perturb_             (Gaussian and Rademacher noise)
     fastmezo restore_and_update_  (Gaussian and Rademacher noise)
     reference perturb and update  (bench/reference_mezo.py: torch.manual_seed + torch.normal,
                                    out of place, as the MeZO paper's trainer does)
   and the peak memory each needs above the parameters (max_memory_allocated - allocated before);
4. derives the ZO overhead of one step: fastmezo 2 perturb + 1 restore_and_update = 3 passes, the
   reference 3 perturb + 1 update = 4 passes;
5. writes a JSON and a CSV (one row per measurement) to --out (default bench/results/) with the GPU
   name, torch/triton/CUDA versions, git commit and date, and prints an aligned table last.

Speed-up vs reference: perturb is compared with the reference perturb pass; restore_and_update, which
fuses two reference passes, with reference perturb + reference update; a step with a reference step.

fastmezo launches one kernel per tensor for now, so small models (OPT-1.3B: 388 tensors) are bound by
launch and Python overhead rather than memory; the us_per_tensor column shows it.

--smoke: a quick self-test that runs anywhere, a GPU or not: tiny OPT-shaped tensors ("opt-tiny"),
few repetitions, results in a temporary directory. Without CUDA it runs on the CPU through the Triton
interpreter (TRITON_INTERPRET=1, set here before triton is imported if not set already); the times
then mean nothing, and memory is not measured.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (does not import triton)

from reference_mezo import NO_DECAY, reference_perturb, reference_update  # noqa: E402
from shapes import numel, opt_param_shapes  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Values of the passes. They do not change the speed; they keep the weights sane over repetitions.
SEED = 0x5EED_1234_ABCD_0042   # fastmezo seed (uint64, both words non-zero)
TORCH_SEED = 1234              # the reference's torch.manual_seed
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
              "n_tensors", "numel", "param_bytes", "bandwidth_gbps", "derived", "device", "gpu",
              "torch", "triton", "cuda", "commit", "date"]


class CheckFailed(RuntimeError):
    """The fast kernels disagree with the torch oracle: the timings would be meaningless."""


# ---------------------------------------------------------------------------------------------------
# Environment


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """What ran: device name, library versions, git commit, date."""
    import fastmezo

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001  (reported, not fatal: the check fails later)
        triton_version = f"unavailable ({type(exc).__name__})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = props.name
        extra = {"gpu_memory_bytes": props.total_memory,
                 "compute_capability": f"{props.major}.{props.minor}",
                 "multiprocessors": props.multi_processor_count}
    else:
        gpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        extra = {}
    # FASTMEZO_COMMIT, when set, names the tree explicitly: a copied working tree (as on a remote GPU
    # machine) can carry a stale .git whose HEAD is not what runs.
    given = os.environ.get("FASTMEZO_COMMIT")
    commit = given or _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no") if commit != "unknown" and not given else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": gpu,
        **extra,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "fastmezo": getattr(fastmezo, "__version__", "unknown"),
        "noise_version": getattr(fastmezo, "NOISE_VERSION", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


# ---------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device):
    """fn followed by a synchronize of ``device``, so wall-clock timers (pytest-benchmark) see the GPU
    work."""
    device = torch.device(device)

    def call():
        fn()
        synchronize(device)
    return call


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of fn after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events, so a call's time is the span between its first and
    its last GPU work, including any gaps where the GPU waited for the host (launch overhead). On the
    CPU, wall-clock time.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for start, end in zip(starts, ends):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    """Peak memory one call of fn allocates above what is allocated before it (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, reps: int) -> dict:
    """Device copy bandwidth: one tensor of nbytes copied into another, (read + written bytes) / time."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_ms(lambda: dst.copy_(src), device, warmup, reps)
    del src, dst
    free_memory(device)
    ms = statistics.median(times)
    moved = 2 * (nbytes // 4) * 4
    return {"copy_bytes": nbytes // 4 * 4, "bytes_moved": moved, "ms_median": ms, "ms_min": min(times),
            "reps": reps, "bandwidth_bytes_per_s": moved / (ms * 1e-3)}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# The kernel check


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at each value of x, as float32."""
    mantissa_bits = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}[x.dtype]
    xf = x.float().abs()
    exponent = torch.floor(torch.log2(torch.clamp(xf, min=torch.finfo(x.dtype).tiny)))
    return torch.pow(2.0, exponent - mantissa_bits)


def check_kernels(device: torch.device, dtypes, n: int, backend: str = "triton") -> list[dict]:
    """Compare the fast kernels of ``backend`` with the torch oracle (fastmezo.reference) before timing them.

    * z itself: ``make_noise(..., backend=backend)`` against ``fastmezo.reference.noise`` at two
      offsets: Rademacher must match exactly, Gaussian within NORMAL_ATOL * (1 + |z|).
    * the perturb pass in every dtype: ``perturb_`` on a parameter-like tensor against
      ``axpbz_reference(x, 1, alpha, z_oracle)``: Rademacher exact, Gaussian within one unit in the
      last place of the dtype (or the Gaussian tolerance times alpha, if larger). Exception: under
      the Triton interpreter (CPU), bfloat16 Rademacher results may be one unit off, because the
      interpreter (triton 3.9) casts float32 to bfloat16 by truncation where the GPU rounds to nearest.

    Returns one record per comparison; raises CheckFailed, with every failure listed, if any fails.
    """
    from fastmezo import functional as F
    from fastmezo import reference as R

    interpreted = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
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
            expect = R.axpbz_reference(x, 1.0, CHECK_ALPHA, ref)
            err = (y.float() - expect.float()).abs()
            if noise == "rademacher" and not (interpreted and dtype == torch.bfloat16):
                ok = torch.equal(y, expect)
            elif noise == "rademacher":
                # Triton's interpreter casts float32 -> bfloat16 by truncation (toward zero), the GPU
                # rounds to nearest even: allow one unit in the last place there.
                ok = bool((err <= _ulp(expect)).all())
            else:
                tol = torch.maximum(_ulp(expect), CHECK_ALPHA * NORMAL_ATOL * (1 + ref.abs()))
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
            lambda s: reference_perturb(params, TORCH_SEED, s, EPS))),
        ("reference", "update", "gaussian", lambda: reference_update(
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
    out_dir.mkdir(parents=True, exist_ok=True)
    env = result["environment"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = "".join(c if c.isalnum() else "-" for c in env["gpu"].lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)[:40]
    base = out_dir / f"perturb-{stamp}-{slug}"
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    meta = {k: env[k] for k in ("device", "gpu", "torch", "triton", "cuda", "commit", "date")}
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**{k: row.get(k) for k in CSV_FIELDS}, **meta})
    return json_path, csv_path


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e9 else f"{n / 1e6:.3f} MB"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
                     str(r["passes"]), _fmt(r["ms_median"], ".3f"), _fmt(r["ratio_to_floor"], ".2f"),
                     _fmt(r["speedup_vs_reference"], ".2f"),
                     _fmt(None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20, ".1f"),
                     _fmt(r["us_per_tensor"], ".1f")])
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
    args.models = [m.strip() for m in (args.models or ("opt-tiny" if args.smoke else "opt-1.3b,opt-13b")).split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    for m in args.models:
        try:
            opt_param_shapes(m)
        except ValueError as exc:
            parser.error(str(exc))
    if args.reps is None:
        args.reps = 1 if args.smoke else 10
    if (args.warmup is not None and args.warmup < 0) or args.reps < 1:
        parser.error("--warmup must be >= 0 and --reps >= 1")
    return args


def main(argv=None) -> dict:
    """Run the benchmark; returns the result dict (also written to --out)."""
    args = parse_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.smoke:
        device = torch.device("cpu")
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            if "triton" in sys.modules:
                raise SystemExit("no CUDA device, and triton was imported before TRITON_INTERPRET=1 could "
                                 "be set: run as TRITON_INTERPRET=1 python bench/bench_perturb.py --smoke")
            os.environ["TRITON_INTERPRET"] = "1"
    else:
        raise SystemExit("no CUDA device: this benchmark needs a GPU (use --smoke to test it on the CPU)")

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

    copy_bytes = (32 << 20) if device.type == "cpu" else (1 << 30)
    bandwidth = copy_bandwidth(device, copy_bytes, warmup=3, reps=5 if args.smoke else 50)
    bw = bandwidth["bandwidth_bytes_per_s"]
    print(f"copy bandwidth: {bw / 1e9:.1f} GB/s ({copy_bytes >> 20} MiB copied, read + write)")

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
        Path(tempfile.mkdtemp(prefix="fastmezo-bench-smoke-")) if args.smoke else HERE / "results")
    json_path, csv_path = write_results(out_dir, result)
    print(f"wrote {json_path}\nwrote {csv_path}\n")
    print(format_table(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
