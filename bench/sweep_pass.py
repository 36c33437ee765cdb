"""Sweep the pass kernel's launch shape (block, chunk, warps) on OPT shapes and one 1 GiB tensor.

    python -m bench.sweep_pass [--models opt-13b] [--dtypes float16,bfloat16] [--out DIR]

Queued kernel time (the GPU kept busy: a loop of launches between two CUDA events), median of 5
rounds, for Gaussian and Rademacher noise, rounding to nearest and stochastically, beside the copy
bandwidth of the same run (the floor: every byte read and written once). This is how DEFAULT_BLOCK,
DEFAULT_CHUNK and the warps of kernels/axpbz.py are chosen; the results say which is fastest where.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from kernels.axpbz import Launches

from .common import copy_bandwidth, environment
from .shapes import opt_param_shapes

SHAPES = [(4096, 1024, 4), (4096, 2048, 4), (4096, 4096, 4), (4096, 1024, 8), (4096, 512, 4)]


def queued_ms(fn, inner: int = 5, rounds: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def tensors_for(name: str, dtype, device):
    if name == "1gib":
        return [torch.randn(2**30 // (torch.finfo(dtype).bits // 8), device=device).to(dtype)]
    return [torch.randn(s, device=device, dtype=dtype) * 0.02 for _, s in opt_param_shapes(name)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="opt-13b,1gib")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--shapes", default=None, help="block:chunk:warps,... (default: a built-in list)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split(":"))) for s in args.shapes.split(",")]
    bw = copy_bandwidth(device, 2**30, 3, 10)
    rows = []
    for model in args.models.split(","):
        for dt in args.dtypes.split(","):
            dtype = getattr(torch, dt)
            xs = tensors_for(model, dtype, device)
            nbytes = sum(x.numel() * x.element_size() for x in xs)
            floor_ms = 2 * nbytes / bw["bandwidth_bytes_per_s"] * 1e3
            keys = list(range(len(xs)))
            for noise in (0, 1):
                for block, chunk, warps in shapes:
                    launches = Launches(xs, keys, noise, block=block, chunk=chunk)
                    for rseed in (None, 0x0123456789ABCDEF):
                        ms = queued_ms(lambda: launches(1.0, 1e-8, 0x5EED, rseed, num_warps=warps))
                        rows.append({"model": model, "dtype": dt, "noise": ["gaussian", "rademacher"][noise],
                                     "rounding": "sr" if rseed else "rn", "block": block, "chunk": chunk,
                                     "warps": warps, "ms": ms, "x_floor": ms / floor_ms})
            del xs
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'model':8} {'dtype':8} {'noise':10} {'rnd':3} {'block':>5} {'chunk':>5} {'w':>2} {'ms':>8} {'xfloor':>6}")
    for r in rows:
        print(f"{r['model']:8} {r['dtype']:8} {r['noise']:10} {r['rounding']:3} {r['block']:5d} {r['chunk']:5d} "
              f"{r['warps']:2d} {r['ms']:8.3f} {r['x_floor']:6.2f}")
    result = {"environment": environment(device), "bandwidth": bw, "rows": rows}
    if args.out:
        with open(f"{args.out}/sweep_pass.json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
