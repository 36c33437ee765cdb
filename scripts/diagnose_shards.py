"""Where a sharded Triton pass differs from the unsharded one (GPU diagnosis for issue 5).

A shard of a tensor (offset = index of its first element) must get the noise and the rounding draws
of the whole tensor, so its stored values must be bit-identical. The whole tensor runs the ALIGNED
kernel, shards at odd offsets the masked one. This script separates the possible causes:
  1. float32 results (no rounding): do z and y = a x + b z already differ between the two kernels?
  2. float16 / bfloat16 round to nearest, then stochastic rounding: which elements differ, by how much,
     and what their float32 y is in each kernel.
Run: python3 scripts/diagnose_shards.py [--n 70003]
"""
import argparse

import torch

from fastmezo.kernels import axpbz as K

SEED = 0xF00DFACE12345678
ROUND_SEED = 0x8000000000000001


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def run(x, cuts, noise, round_seed, alpha=5e-3):
    whole = x.clone()
    K.axpbz_(whole, 1.0, alpha, SEED, 9, noise, round_seed=round_seed)
    shards = []
    for lo, hi in zip(cuts, cuts[1:]):
        s = x[lo:hi].clone()
        K.axpbz_(s, 1.0, alpha, SEED, 9, noise, offset=lo, round_seed=round_seed)
        shards.append(s)
    return whole, torch.cat(shards)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=70003)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    n = args.n
    cuts = [0, 1, 9, 130, n // 2 + 3, n]
    g = torch.Generator().manual_seed(6)
    base = torch.randn(n, generator=g)
    rows = []
    for noise, nname in ((0, "gaussian"), (1, "rademacher")):
        # 1. float32 y from the float16 values (x converts exactly, so y is the y of the fp16 kernel).
        for dtype in (torch.float16, torch.bfloat16):
            xs = base.to(dtype)
            w32, s32 = run(xs.float().to(args.device), cuts, noise, None)
            d32 = (_bits(w32) != _bits(s32)).nonzero().flatten().cpu()
            for rnd in (None, ROUND_SEED):
                w, s = run(xs.to(args.device), cuts, noise, rnd)
                d = (_bits(w) != _bits(s)).nonzero().flatten().cpu()
                rows.append((nname, str(dtype).split(".")[-1], "SR" if rnd else "RN", len(d32), len(d)))
                for i in d[:5].tolist():
                    print(f"{nname} {dtype} {'SR' if rnd else 'RN'} i={i} shard={next(j for j, c in enumerate(cuts[1:]) if i < c)}"
                          f" x={xs[i].item()!r} whole={w[i].item()!r} shard={s[i].item()!r}"
                          f" y32 whole={w32[i].item()!r} shard={s32[i].item()!r}")
    print(f"\n{'noise':<11} {'dtype':<9} {'mode':<4} {'fp32 y diffs':>12} {'stored diffs':>12}  (n={n})")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:<9} {r[2]:<4} {r[3]:>12} {r[4]:>12}")


if __name__ == "__main__":
    main()
