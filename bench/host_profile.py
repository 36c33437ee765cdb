"""Where the host time of a pass goes: the public calls on a model's tensor count, profiled.

    python -m bench.host_profile [--model opt-13b] [--device cuda] [--calls 50] [--rows 18] [--full-size]

Builds one small float16 tensor (4096 elements) per parameter tensor of the model (bench/shapes.py), so
that the kernels take no time and what is measured is the host (``--full-size``: the model's real
shapes, for host work that grows with a tensor's size, e.g. the kernels' launch tables): the median wall time of ``perturb_``
(Gaussian, stochastic rounding, Rademacher, named pairs or a list) and of ``MeZO.step`` with a constant
loss, then a cProfile of ``perturb_`` over the same number of calls, sorted by own time. On a GPU the
calls are queued behind nothing and return once launched, so the wall time is the host time before
the kernel starts (bench_user_view's ``host`` column, without a busy GPU).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from .shapes import opt_param_shapes


def median_ms(fn, calls: int) -> float:
    for _ in range(5):
        fn(1.0)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(-1.0 if i % 2 else 1.0)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-13b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rows", type=int, default=18, help="rows of the profile printed")
    p.add_argument("--full-size", action="store_true", help="the model's real shapes, not 4096 elements")
    args = p.parse_args(argv)
    import fastmezo
    from fastmezo import functional as F

    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    named = [(name, torch.nn.Parameter(torch.randn(shape if args.full_size else (4096,), generator=gen,
                                                   device=device, dtype=torch.float16)))
             for name, shape in opt_param_shapes(args.model)]
    params = [p for _, p in named]
    opt = fastmezo.MeZO(named, lr=1e-7, eps=1e-3)
    cases = {
        "perturb_ named, gaussian": lambda s: F.perturb_(named, 0, s * 1e-3),
        "perturb_ named, gaussian, stochastic rounding": lambda s: F.perturb_(named, 0, s * 1e-3, rounding_seed=1),
        "perturb_ named, rademacher": lambda s: F.perturb_(named, 0, s * 1e-3, noise="rademacher"),
        "perturb_ list, gaussian": lambda s: F.perturb_(params, 0, s * 1e-3),
        "MeZO.step, constant loss": lambda s: opt.step(lambda: 1.0),
    }
    result = {"model": args.model, "tensors": len(named), "device": str(device), "full_size": args.full_size,
              "host_ms": {}}
    for label, fn in cases.items():
        result["host_ms"][label] = ms = median_ms(fn, args.calls)
        print(f"{label:48s} {ms:8.3f} ms  ({len(named)} tensors, {args.device})")
    profile = cProfile.Profile()
    profile.enable()
    for i in range(args.calls):
        cases["perturb_ named, gaussian"](-1.0 if i % 2 else 1.0)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.rows)
    result["profile"] = text.getvalue()
    print(result["profile"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result


if __name__ == "__main__":
    main()
