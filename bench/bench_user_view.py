"""Passes and the ZO overhead of a step as the user sees them: public API, default options, host time in.

Each timed call starts with the GPU idle (synchronized before), is bracketed by CUDA events and ends
with a synchronize: the span covers the Python before the first kernel starts. Beside it, the kernel
time of the same call measured with the calls queued back to back (the GPU kept busy, so host time
hides behind the queue), and the host time of the call (wall clock around the call while the GPU is
busy, so it returns as soon as its launches are queued: for a one-launch pass, the host time before
its kernel starts). Cases: perturb_ (Gaussian with either rounding, Rademacher) and
restore_and_update_ on each model's shapes, MeZO.step's overhead (default options and round to
nearest), and perturb_ on one 1 GiB tensor (Gaussian and Rademacher). The reference (bench/baseline.py: torch.manual_seed + torch.normal per tensor,
out of place) is timed the same way in the same run. The floor is one read and one write of every
parameter at the measured copy bandwidth (a step's overhead is three passes: its ratio to the one-pass
floor is at least 3). The reference's step overhead is three perturb passes and one update.

    python -m bench.bench_user_view --models opt-1.3b,opt-13b --out bench/results/<date>-h200-user-view

``--smoke``: tiny shapes on the CPU, one call per case, to check that the script runs (CPU timings are
wall clock: user view, queued and host time are then the same measurement).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import fastmezo
from fastmezo import functional as F

from .baseline import baseline_perturb, baseline_update
from .common import default_copy_bandwidth, environment, free_memory, main_exit, split_list, write_json
from .shapes import opt_param_shapes

SEED, EPS, LR, G = 1234, 1e-3, 1e-6, 0.5


def _wall_ms(fn, reps: int, before=None, after=None) -> float:
    """Median host wall time of ``fn`` (``before``/``after`` run outside the timed span)."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if after is not None:
            after()
    return statistics.median(times)


def _warm_up(fn, reps: int, device):
    """One untimed call; on a CPU (the smoke run) the wall time of ``reps`` calls, else None. The device
    defaults to CUDA (other benchmarks call the timers without one)."""
    fn()
    if device is not None and device.type != "cuda":
        return _wall_ms(fn, reps)
    torch.cuda.synchronize()
    return None


def user_view_ms(fn, reps: int, device=None) -> float:
    """Median of per-call spans, each call starting on an idle GPU."""
    if (cpu := _warm_up(fn, reps, device)) is not None:
        return cpu
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def queued_ms(fn, reps: int, device=None) -> float:
    """Mean time per call with the calls queued back to back: the GPU's own time when the host keeps up."""
    if (cpu := _warm_up(fn, reps, device)) is not None:
        return cpu
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)          # a head start for the queue: the host enqueues while this runs
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def host_ms(fn, reps: int, device=None) -> float:
    """Median host wall time of a call while the GPU is busy: the call returns once its launches are
    queued, so this is the Python and launch time the user waits before the first kernel can start."""
    if (cpu := _warm_up(fn, reps, device)) is not None:
        return cpu
    # A sleep kernel keeps the GPU busy past the call, so nothing in it waits on a kernel.
    return _wall_ms(fn, reps, before=lambda: torch.cuda._sleep(20_000_000), after=torch.cuda.synchronize)


def _row(model, dtype, n_tensors, what, fn, reps, device, floor_ms) -> dict:
    user, kernel, host = user_view_ms(fn, reps, device), queued_ms(fn, reps, device), host_ms(fn, reps, device)
    print(f"{model:9s} {what:50s} user {user:8.2f} ms  queued {kernel:8.2f} ms  host {host:6.3f} ms  "
          f"x one-pass floor {user / floor_ms:5.2f}", flush=True)
    return dict(model=model, dtype=str(dtype).split(".")[-1], tensors=n_tensors, what=what, user_ms=user,
                queued_ms=kernel, host_ms=host, user_minus_queued_ms=user - kernel, floor_ms=floor_ms,
                x_floor=user / floor_ms)


def _params(model: str, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                                      .mul_(0.02).to(dtype))) for name, shape in opt_param_shapes(model)]


def bench_model(model: str, dtype, device, bandwidth: float, reps: int) -> list[dict]:
    named = _params(model, dtype, device)
    params = [p for _, p in named]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    floor_ms = 2 * nbytes / bandwidth * 1e3
    opt = fastmezo.MeZO(named, lr=LR, eps=EPS)           # defaults: stochastic rounding of the update pass
    opt_sr = fastmezo.MeZO(named, lr=LR, eps=EPS, stochastic_rounding=True)
    opt_rn = fastmezo.MeZO(named, lr=LR, eps=EPS, stochastic_rounding=False)
    sign = [1.0]

    def alternate(fn):
        def call():                        # +alpha, then -alpha: the weights stay where they were
            sign[0] = -sign[0]
            fn(sign[0])
        return call

    cases = [
        ("perturb_ gaussian (round to nearest)", alternate(lambda s: F.perturb_(named, SEED, s * EPS))),
        ("perturb_ gaussian (stochastic rounding)",
         alternate(lambda s: F.perturb_(named, SEED, s * EPS, rounding_seed=SEED + 1))),
        ("perturb_ rademacher", alternate(lambda s: F.perturb_(named, SEED, s * EPS, noise="rademacher"))),
        ("restore_and_update_", lambda: F.restore_and_update_(named, SEED, EPS, LR, G)),
        ("MeZO.step overhead (default: stochastic rounding of the update)", lambda: opt.step(lambda: 1.0)),
        ("MeZO.step overhead (stochastic rounding in every pass)", lambda: opt_sr.step(lambda: 1.0)),
        ("MeZO.step overhead (round to nearest)", lambda: opt_rn.step(lambda: 1.0)),
        ("reference perturb", alternate(lambda s: baseline_perturb(params, SEED, s, EPS))),
        ("reference update", lambda: baseline_update(params, SEED, LR, G, 0.0)),
    ]
    return [_row(model, dtype, len(params), what, fn, reps, device, floor_ms) for what, fn in cases]


def bench_single_tensor(nbytes: int, dtype, device, bandwidth: float, reps: int) -> list[dict]:
    """perturb_ with the default options on one tensor of ``nbytes`` (Gaussian and Rademacher)."""
    x = torch.randn(nbytes // torch.finfo(dtype).bits * 8, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
    floor_ms = 2 * nbytes / bandwidth * 1e3
    label = f"one {nbytes / 2**30:g} GiB tensor" if nbytes >= 1 << 30 else f"one {nbytes >> 20} MiB tensor"
    sign = [1.0]
    rows = []
    for noise in ("gaussian", "rademacher"):
        def call(noise=noise):
            sign[0] = -sign[0]
            F.perturb_(x, SEED, sign[0] * EPS, noise=noise)
        rows.append(_row(label, dtype, 1, f"perturb_ {noise}", call, reps, device, floor_ms))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="opt-1.3b,opt-13b", help="comma-separated OPT shapes")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=20, help="timed calls per case")
    parser.add_argument("--tensor-bytes", type=int, default=1 << 30, help="size of the single-tensor case")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, one call per case")
    parser.add_argument("--out", type=Path, help="folder for results.json")
    args = parser.parse_args(argv)
    if args.smoke:
        device, models, reps, nbytes = torch.device("cpu"), ["opt-tiny"], 1, 1 << 20
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke)")
    else:
        device, models, reps, nbytes = torch.device("cuda"), split_list(args.models), args.reps, args.tensor_bytes
    dtype = getattr(torch, args.dtype)
    bandwidth = default_copy_bandwidth(device, smoke=args.smoke)["bandwidth_bytes_per_s"]
    rows = []
    for model in models:
        rows += bench_model(model, dtype, device, bandwidth, reps)
        free_memory(device)
    rows += bench_single_tensor(nbytes, dtype, device, bandwidth, reps)
    result = dict(environment=environment(device), copy_bandwidth_bytes_per_s=bandwidth, rows=rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "results.json", result)
    return result


if __name__ == "__main__":
    main_exit(main)
