"""Benchmark of the native CPU backend: one MeZO perturbation pass over one large tensor, fastmezo's
C++ kernels (OpenMP + SIMD, fastmezo._C) against the torch way on the CPU.

    python -m bench.bench_native_cpu [--numel 100000000] [--dtypes float32,float16,bfloat16]
                                      [--threads N] [--reps 5] [--out DIR] [--smoke]

For each dtype, on a tensor of --numel random weights:
  * fastmezo perturb gaussian / rademacher: ``fastmezo.functional.perturb_([x], seed, eps,
    backend="native")``: one in-place pass, Philox noise made inside the kernel;
  * torch way: the baseline, the MeZO paper's trainer (bench/baseline.py): ``torch.manual_seed(seed)``,
    ``z = torch.normal(...)`` in the tensor's dtype, ``x = x + eps * z`` out of place;
  * copy floor: ``y.copy_(x)``, reading and writing every byte once, the least an in-place pass can take.
Before timing, the native kernels are checked against the torch oracle (fastmezo.oracle) on a
sample (Rademacher bit for bit, Gaussian within the contract's tolerance); the script stops if they
disagree. Times are wall-clock medians of --reps runs after one warm-up. torch.get_num_threads() (and
--threads) sets the threads of both sides. Results: a JSON and a CSV in --out (default
bench/results/<date>-cpu-native/), and a table printed last. --smoke: 1M elements, 2 reps, a temporary dir.

Not a test: it runs minutes and needs ~2.5 GB of memory at the default size (the torch way's
temporaries: z, eps * z and the new tensor).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.baseline import baseline_perturb
from bench.common import BASELINE_SEED, FASTMEZO_SEED, RESULTS, environment, fastmezo_backend, write_csv, write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEED = FASTMEZO_SEED
TORCH_SEED = BASELINE_SEED
EPS = 1e-3


def native_environment() -> dict:
    """The common provenance record, plus whether the native library was built with OpenMP."""
    try:
        from fastmezo import _C
        openmp = bool(getattr(_C, "WITH_OPENMP", None)) if hasattr(_C, "WITH_OPENMP") else None
    except ImportError:
        openmp = None
    return {**environment(torch.device("cpu")), "native_openmp": openmp}


def check_native() -> None:
    """The kernels against the oracle on a sample (unaligned offset beyond 2**32), all dtypes."""
    from fastmezo import functional as F
    from fastmezo import oracle as R

    n, offset = 100_003, (1 << 32) + 5
    for dtype in DTYPES.values():
        x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
        for noise in ("gaussian", "rademacher"):
            got = x.clone()
            F.perturb_([got], SEED, 0.5, noise=noise, offsets=[offset], backend="native")
            z = R.noise(n, SEED, 0, noise, offset)
            expected = (x.float() + 0.5 * z).to(dtype)
            if noise == "rademacher":
                ok = torch.equal(got, expected)
            else:
                # the contract's normal tolerance, plus one ulp of the dtype for the final rounding
                tol = 0.5 * 1e-5 * (1 + z.double().abs()) + torch.finfo(dtype).eps * expected.double().abs()
                ok = bool(((got.double() - expected.double()).abs() <= tol).all())
            if not ok:
                raise SystemExit(f"native kernel disagrees with the oracle ({dtype}, {noise}): not timing it")


def time_s(fn, reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_dtype(name: str, numel: int, reps: int) -> list[dict]:
    from fastmezo import functional as F

    dtype = DTYPES[name]
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(dtype) * 0.02
    nbytes = x.numel() * x.element_size()
    rows = []

    def row(method, times):
        med = statistics.median(times)
        return {"dtype": name, "method": method, "numel": numel, "median_s": med, "min_s": min(times),
                "reps": len(times), "ns_per_element": med * 1e9 / numel,
                "effective_gb_per_s": 2 * nbytes / med / 1e9}

    y = torch.empty_like(x)
    rows.append(row("copy floor (y.copy_(x))", time_s(lambda: y.copy_(x), reps)))
    del y
    sign = [1.0]

    def native(noise):
        def run():
            F.perturb_([x], SEED, sign[0] * EPS, noise=noise, backend="native")
            sign[0] = -sign[0]  # alternate +eps / -eps so the weights stay where they are
        return run

    rows.append(row("fastmezo native perturb gaussian", time_s(native("gaussian"), reps)))
    rows.append(row("fastmezo native perturb rademacher", time_s(native("rademacher"), reps)))
    holder = [x]

    def torch_way():
        baseline_perturb(holder, TORCH_SEED, 1.0, EPS)  # manual_seed + torch.normal + out-of-place add

    rows.append(row("torch way (manual_seed + normal + add)", time_s(torch_way, reps)))
    ref = rows[-1]["median_s"]
    for r in rows:
        r["speedup_vs_torch_way"] = ref / r["median_s"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="1M elements, 2 reps, output in a temporary dir")
    args = parser.parse_args(argv)
    if args.smoke:
        args.numel, args.reps = 1_000_000, 2
        args.out = args.out or tempfile.mkdtemp(prefix="fastmezo-bench-cpu-")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        fastmezo_backend(torch.device("cpu"), "native")
    except Exception as exc:  # noqa: BLE001  (fastmezo's reason is the message)
        print(f"the native backend cannot run: {exc}", file=sys.stderr)
        return 2
    check_native()
    env = native_environment()
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) if args.out else RESULTS / f"{stamp:%Y-%m-%d}-cpu-native"
    rows = []
    for name in args.dtypes.split(","):
        rows += bench_dtype(name.strip(), args.numel, args.reps)
    base = out / f"native-cpu-{stamp:%Y%m%dT%H%M%SZ}"
    write_json(base.with_suffix(".json"), {"environment": env, "numel": args.numel, "eps": EPS, "rows": rows})
    write_csv(base.with_suffix(".csv"), list(rows[0]), rows)
    print(f"{env['gpu']}, torch.get_num_threads() = {env['torch_num_threads']}, "
          f"torch {env['torch']}, commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}")
    print(f"one pass over {args.numel:,} elements, median of {args.reps} (wall clock)\n")
    print(f"{'dtype':9} {'method':42} {'ms':>9} {'ns/elem':>8} {'GB/s':>6} {'vs torch way':>12}")
    for r in rows:
        print(f"{r['dtype']:9} {r['method']:42} {r['median_s'] * 1e3:9.1f} {r['ns_per_element']:8.2f} "
              f"{r['effective_gb_per_s']:6.1f} {r['speedup_vs_torch_way']:11.1f}x")
    print(f"\nresults: {base}.json, {base}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
