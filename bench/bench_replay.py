"""Replay at memory speed: N recorded steps replayed K steps per pass (kernels/replay.py through
fastmezo.replay's fused path) against N single passes (fastmezo.replay's default path: Plan.run, the
Triton table kernel), on OPT-shaped parameters.

    python -m bench.bench_replay                       # OPT-13B shapes, fp16, exact-mode steps, N=64
    python -m bench.bench_replay --mode inplace --steps 128 --ks 1,2,4,8,16 --out DIR
    python -m bench.bench_replay --smoke               # opt-tiny on the CPU (Triton interpreter)

Steps are synthetic (random seeds and projected gradients, lr 1e-6, weight decay 0.1 on every tensor,
stochastic rounding for fp16/bf16): exact mode replays one update pass a step, in place three. Before
timing, the fused result of a few steps is checked bit for bit against the single passes on the
parameters. Reports ms per replayed step for each K, the speed-up over single passes and the fastest
K; the issue's target is replaying 1,000 steps in less than 1,000/8 single passes' time, i.e. a
speed-up above 8 at some K.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from bench.common import environment, main_exit, run_stem, select_device, synchronize, time_ms, write_json
from bench.shapes import opt_param_shapes

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def synthetic_work(n: int, mode: str, rounding: bool, seed: int = 0) -> list:
    """n steps as fastmezo.replay builds them: (seed, [(a per group, b per group, round seed)])."""
    from fastmezo import engine
    from fastmezo.noise import rounding_seed
    from fastmezo.replayer import step_passes

    rng = random.Random(seed)
    work = []
    for t in range(n):
        record = dict(step=t, seed=rng.getrandbits(64), grads=[rng.gauss(0.0, 10.0)], lr=[1e-6],
                      weight_decay=[0.1], eps=[1e-3], update_pass=engine.RESTORE, skipped=None)
        passes = [(a, b, rounding_seed(record["seed"], p) if rounding else None)
                  for a, b, p in step_passes(mode, record)]
        work.append((record["seed"], passes))
    return work


def run_single(plan, work) -> None:
    for seed, passes in work:
        for a, b, rs in passes:
            plan.run(seed, a, b, round_seed=rs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--mode", default="exact", choices=["exact", "inplace"])
    parser.add_argument("--steps", type=int, default=64, help="N steps replayed per timing")
    parser.add_argument("--ks", default="1,2,4,8,16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="opt-tiny on the CPU, few steps")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON result")
    args = parser.parse_args(argv)
    device = select_device(args.smoke, "bench.bench_replay")
    from fastmezo.plan import Plan
    from fastmezo.replayer import _run_fused

    model = "opt-tiny" if args.smoke else args.model
    steps = 4 if args.smoke else args.steps
    dtype = DTYPES[args.dtype]
    shapes = opt_param_shapes(model)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = [(torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype) for _, s in shapes]
    plan = Plan(tensors, [n for n, _ in shapes], keys="name", backend="triton")
    rounding = dtype != torch.float32
    work = synthetic_work(steps, args.mode, rounding)
    ks = [int(k) for k in args.ks.split(",")]

    # Correctness first: the fused path equals the single passes bit for bit (3 steps, K = 2).
    small = sorted(range(len(tensors)), key=lambda i: tensors[i].numel())[:8]
    check = Plan([tensors[i].clone() for i in small], [shapes[i][0] for i in small], keys="name", backend="triton")
    fused = Plan([t.clone() for t in check.tensors], check.names, keys="name", backend="triton")
    run_single(check, work[:3])
    _run_fused(fused, work[:3], 2)
    if not all(torch.equal(a, b) for a, b in zip(check.tensors, fused.tensors)):
        raise SystemExit("error: the fused replay differs from the single passes")

    reps, warmup = (1, 0) if args.smoke else (args.reps, 1)
    single = min(time_ms(lambda: run_single(plan, work), device, warmup, reps)) / steps
    rows = [dict(k="single", ms_per_step=single, speedup=1.0)]
    for k in ks:
        ms = min(time_ms(lambda: _run_fused(plan, work, k), device, warmup, reps)) / steps
        rows.append(dict(k=k, ms_per_step=ms, speedup=single / ms))
    synchronize(device)
    best = min(rows[1:], key=lambda r: r["ms_per_step"])
    print(f"{model} {args.dtype} {args.mode} steps, N={steps}, {sum(t.numel() for t in tensors) / 1e9:.2f}G params")
    for r in rows:
        print(f"  K={r['k']!s:>6}: {r['ms_per_step']:9.3f} ms/step  x{r['speedup']:.2f}")
    print(f"fastest K={best['k']}: x{best['speedup']:.2f} over single passes (target: > 8)")
    if args.out is not None:
        env = environment(device)
        write_json(args.out / f"{run_stem('replay', env)}.json",
                   dict(env=env, model=model, dtype=args.dtype, mode=args.mode, steps=steps, rows=rows,
                        fastest_k=best["k"]))
    return 0


if __name__ == "__main__":
    main_exit(main)
