"""Where the time of a stochastically rounded pass goes: one contiguous tensor, variants of the pass
that leave one stage of stochastic rounding out, timed beside the production pass.

    python -m bench.sr_anatomy [--gib 1] [--dtypes float16,bfloat16] [--out DIR]
    ncu --clock-control none -k regex:_variant --metrics smsp__inst_executed.sum,... \
        python -m bench.sr_anatomy --gib 0.25 --only sr:float16:4096:4

Variants (MODE): rn = round to nearest; sr = the contract's stochastic rounding (Philox stream 2
draws + round_stochastic); sr-nodraw = round_stochastic with draws from a cheap integer hash of the
index (no Philox: what the rounding arithmetic costs); draw-only = the Philox draws computed and kept
alive, rounding to nearest (what the draws cost). Gaussian noise, in place, a = 1, b = 1e-3.
The differences give each stage's cost (a lab measurement: the variants' bits are not the contract's).
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from kernels.axpbz import Launches, _NO_FMA_CONTRACTION, _INTERPRETING
from kernels.philox import gaussian_block, round_stochastic, rounding_draws

from .sweep_pass import queued_ms

MODES = {"rn": 0, "sr": 1, "sr-nodraw": 2, "draw-only": 3}


@triton.jit(do_not_specialize=["n", "a", "b", "s0", "s1", "key"])
def _variant(x_ptr, n, a, b, s0, s1, key, MODE: tl.constexpr, BLOCK: tl.constexpr, FAST: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    first = pid * BLOCK
    ctr = first // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    z = gaussian_block(ctr, s0, s1, key, FAST)
    idx = first + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < n
    y = a * tl.load(x_ptr + idx, mask=mask).to(tl.float32) + b * z
    ELEM = x_ptr.dtype.element_ty
    if MODE == 0:
        v = y.to(ELEM)
    elif MODE == 1:
        r = rounding_draws(first // 8, BLOCK // 8, s1, s0, key, FAST)
        v = round_stochastic(y, r, ELEM)
    elif MODE == 2:
        h = (idx.to(tl.uint32) * 0x9E3779B1)
        r = h >> 16
        v = round_stochastic(y, r, ELEM)
    else:
        r = rounding_draws(first // 8, BLOCK // 8, s1, s0, key, FAST)
        v = (y + r.to(tl.float32) * 1e-30).to(ELEM)
    tl.store(x_ptr + idx, v, mask=mask)


def run_variant(x, mode: str, block: int, warps: int) -> None:
    n = x.numel()
    _variant[(triton.cdiv(n, block),)](x, n, 1.0, 1e-3, 0x1234, 0x5678, 3, MODE=MODES[mode], BLOCK=block,
                                        FAST=not _INTERPRETING,
                                        num_warps=warps, **_NO_FMA_CONTRACTION)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--blocks", default="1024,2048,4096")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--only", default=None, help="one 'mode:dtype:block:warps' launch, once (for ncu)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    if args.only:
        mode, dt, block, warps = args.only.split(":")
        x = torch.randn(int(args.gib * 2**30) // 2, device=dev).to(getattr(torch, dt))
        run_variant(x, mode, int(block), int(warps))
        torch.cuda.synchronize()
        return {}
    rows = []
    for dt in args.dtypes.split(","):
        dtype = getattr(torch, dt)
        x = torch.randn(int(args.gib * 2**30) // 2, device=dev).to(dtype)
        floor = 2 * x.numel() * x.element_size()
        copy = queued_ms(lambda: torch.add(x, 1, out=x))
        prod = Launches([x], [3], 0)
        for rs in (None, 0x0123456789ABCDEF):
            ms = queued_ms(lambda: prod(1.0, 1e-3, 0x5EED, rs))
            rows.append({"dtype": dt, "variant": "production-" + ("sr" if rs else "rn"), "block": 4096, "warps": 4,
                         "ms": ms, "tb_s": floor / ms / 1e9})
        for block in map(int, args.blocks.split(",")):
            for warps in map(int, args.warps.split(",")):
                for mode in MODES:
                    ms = queued_ms(lambda: run_variant(x, mode, block, warps))
                    rows.append({"dtype": dt, "variant": mode, "block": block, "warps": warps, "ms": ms,
                                 "tb_s": floor / ms / 1e9})
        rows.append({"dtype": dt, "variant": "torch-add-inplace", "block": 0, "warps": 0, "ms": copy,
                     "tb_s": floor / copy / 1e9})
    print(f"{'dtype':9} {'variant':18} {'block':>5} {'w':>2} {'ms':>8} {'TB/s':>6}")
    for r in rows:
        print(f"{r['dtype']:9} {r['variant']:18} {r['block']:5d} {r['warps']:2d} {r['ms']:8.3f} {r['tb_s']:6.2f}")
    if args.out:
        with open(f"{args.out}/sr_anatomy.json", "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, f, indent=1)
    return {"rows": rows}


if __name__ == "__main__":
    main()
