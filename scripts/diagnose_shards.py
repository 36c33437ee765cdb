"""Where a sharded Triton pass differs from the unsharded one (GPU diagnosis for issue 5).

A shard of a tensor (offset = index of its first element) must get the noise and the rounding draws
of the whole tensor, so its stored values must be bit-identical. The whole tensor runs the ALIGNED
kernel, shards at odd offsets the masked one. This script separates the possible causes:
  1. float32 results (no rounding): do z and y = a x + b z already differ between the two kernels?
  2. float16 / bfloat16 round to nearest, then stochastic rounding: which elements differ, by how much,
     and what their float32 y is in each kernel.
  3. against the oracle (fastmezo.reference): which of the two is wrong, where in the block the wrong
     elements lie, and in which direction they err (a lost round-up vs a spurious one).
Run: python3 scripts/diagnose_shards.py [--n 70003] [--v0]   (--v0: the float16 rounding before the fix)
"""
import argparse

import torch
import triton
import triton.language as tl

from fastmezo.kernels import axpbz as K


# The float16 rounding of commit bcf5143 (before the rewrite on float32 bit patterns), kept for --v0.
@triton.jit
def round_stochastic_v0(y, r, DTYPE: tl.constexpr):
    """float32 y -> DTYPE (float16 or bfloat16) rounded stochastically by the 16-bit draws r (uint32),
    bit-identical to fastmezo.reference.round_stochastic (docs/noise.md section 8): lo = y toward zero,
    hi = the next value away from zero, q = 2**16 |y - lo| / |hi - lo|, hi if q + r >= 2**16.

    Written with integer operations instead of a division (an exact division costs ~20 instructions an
    element on CUDA; the pass is compute-bound): for bfloat16, lo is y's float32 pattern truncated and
    q its low 16 bits, so the rule is "add r, truncate"; for float16 the gap hi - lo is a power of
    two, and 2**16 / gap is built from lo's exponent."""
    if DTYPE == tl.bfloat16:
        ybits = y.to(tl.uint32, bitcast=True)
        trunc = ybits >> 16
        summed = (ybits + r) >> 16                  # carries into the exponent when rounding up
        finite = (ybits & 0x7F800000) != 0x7F800000
        to_inf = (summed & 0x7FFF) == 0x7F80        # rounding up a finite y to inf: saturate instead
        nearest = y.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        out = tl.where(finite, tl.where(to_inf, trunc, summed), nearest)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        nearest = y.to(tl.float16)
        bits = nearest.to(tl.int16, bitcast=True).to(tl.int32)
        overshoot = tl.abs(nearest.to(tl.float32)) > tl.abs(y)
        lo_bits = tl.where(overshoot, bits - 1, bits)          # magnitude one step toward zero
        lo = lo_bits.to(tl.int16).to(tl.float16, bitcast=True)
        hi = (lo_bits + 1).to(tl.int16).to(tl.float16, bitcast=True)
        e = tl.maximum((lo_bits >> 10) & 0x1F, 1)            # gap = 2**(e - 25) (subnormals: e = 1)
        inv_gap = ((168 - e) << 23).to(tl.float32, bitcast=True)   # 2**16 / gap = 2**(41 - e)
        q = tl.abs(y - lo.to(tl.float32)) * inv_gap            # NaN for non-finite y: never up
        to_inf = ((lo_bits + 1) & 0x7FFF) == 0x7C00
        up = ((q + r.to(tl.float32)) >= 65536.0) & (~to_inf)
        return tl.where(up, hi, lo)


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
    ap.add_argument("--v0", action="store_true", help="use the float16 rounding of commit bcf5143")
    args = ap.parse_args()
    if args.v0:
        K.round_stochastic = round_stochastic_v0     # resolved from the module's globals at compile time
    from fastmezo import reference as R
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
                want = xs.clone()
                R.axpbz_(want, 1.0, 5e-3, SEED, 9, noise, round_seed=rnd)
                ow = int((_bits(w.cpu()) != _bits(want)).sum())
                bad = (_bits(s.cpu()) != _bits(want)).nonzero().flatten()
                lost_up = int((s.cpu()[bad].abs() < want[bad].abs()).sum())
                rows.append((nname, str(dtype).split(".")[-1], "SR" if rnd else "RN", len(d32), len(d), ow,
                             len(bad), lost_up))
                if len(bad):
                    # position of each wrong element in its program's block (shard 3 starts at 130: block 128)
                    pos = [(i - 128) % K.DEFAULT_BLOCK for i in bad.tolist() if 130 <= i < cuts[4]]
                    hist = torch.histc(torch.tensor(pos, dtype=torch.float32), bins=8, min=0, max=K.DEFAULT_BLOCK)
                    lanes = torch.bincount(bad % 8, minlength=8)
                    print(f"{nname} {dtype} {'SR' if rnd else 'RN'}: wrong shard elements by block position /512: "
                          f"{hist.int().tolist()}, by index % 8: {lanes.tolist()}")
                for i in d[:5].tolist():
                    print(f"{nname} {dtype} {'SR' if rnd else 'RN'} i={i} shard={next(j for j, c in enumerate(cuts[1:]) if i < c)}"
                          f" x={xs[i].item()!r} whole={w[i].item()!r} shard={s[i].item()!r}"
                          f" y32 whole={w32[i].item()!r} shard={s32[i].item()!r}")
    print(f"\n{'v0' if args.v0 else 'current'} float16 rounding; n={n}; whole = aligned kernel, shards = masked kernel")
    print(f"{'noise':<11} {'dtype':<9} {'mode':<4} {'fp32 y diffs':>12} {'shard!=whole':>12} {'whole!=oracle':>13}"
          f" {'shard!=oracle':>13} {'lost round-ups':>14}")
    for r in rows:
        print(f"{r[0]:<11} {r[1]:<9} {r[2]:<4} {r[3]:>12} {r[4]:>12} {r[5]:>13} {r[6]:>13} {r[7]:>14}")


if __name__ == "__main__":
    main()
