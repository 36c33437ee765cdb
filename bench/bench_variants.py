"""Pass variants on one device: round-to-nearest vs stochastic rounding, in place vs out of place
(exact mode's perturbed copy), Gaussian vs Rademacher, on OPT parameter shapes and on one large
tensor. Each time is reported with its ratio to the one-pass floor (every element read and written
once at the copy bandwidth measured in the same run) and the host time of the call (launch cost).

    python -m bench.bench_variants --models opt-1.3b,opt-13b --dtypes float16,bfloat16

Checks the variants against the torch oracle on a sample before timing (bench_perturb.check_kernels
covers round-to-nearest; the stochastic-rounding and out-of-place variants are checked here).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import DTYPES, copy_bandwidth, environment, free_memory, host_ms, time_ms
from bench.shapes import opt_param_shapes
from fastmezo import functional as F
from fastmezo import oracle as R
from fastmezo.noise import rounding_seed


def check_variants(device: torch.device, backend: str) -> None:
    """Stochastic rounding and out-of-place passes agree with the oracle (bit-identical rounding
    given the backend's own z; x untouched by the out-of-place pass)."""
    n = 10_007
    for dtype in (torch.float16, torch.bfloat16):
        for noise in ("gaussian", "rademacher"):
            x = (torch.randn(n, device=device) * 0.02).to(dtype)
            z = F.make_noise(n, 11, 3, noise=noise, device=device, backend=backend)
            rs = rounding_seed(11, 0)
            r = R.rounding_bits_at(torch.arange(n, device=device), rs, 3)
            y = R.pass_with_z(x, 1.0, 1e-3, z, r)
            got = x.clone()
            F.perturb_([got], 11, 1e-3, keys=[3], noise=noise, rounding_seed=rs, backend=backend)
            mismatch = (got != y).sum().item()
            # y is computed without FMA contraction here, the kernel may contract: rare 1-step flips.
            if mismatch > n // 1000:
                raise AssertionError(f"stochastic rounding {dtype} {noise}: {mismatch} of {n} differ")
            before = x.clone()
            out = F.perturbed([x], 11, 1e-3, keys=[3], noise=noise, backend=backend)[0]
            if not torch.equal(x, before):
                raise AssertionError("the out-of-place pass changed its input")
            ref = R.pass_with_z(x, 1.0, 1e-3, z)
            ulps = ((out.float() - ref.float()).abs() > 0).sum().item()
            if ulps > n // 1000:
                raise AssertionError(f"out-of-place {dtype} {noise}: {ulps} of {n} differ")


def run(models, dtypes, device, backend, reps):
    bw = copy_bandwidth(device, 1 << 30, 3, 10)["bandwidth_bytes_per_s"]
    rows = []
    sets = [(m, [s for _, s in opt_param_shapes(m)]) for m in models] + [("1GiB-tensor", None)]
    for label, shapes in sets:
        for dname in dtypes:
            dtype = DTYPES[dname]
            if shapes is None:
                shapes = [((1 << 30) // torch.tensor([], dtype=dtype).element_size(),)]
            xs = [(torch.randn(s, device=device) * 0.02).to(dtype) for s in shapes]
            elems = sum(x.numel() for x in xs)
            floor_ms = 2 * elems * xs[0].element_size() / bw * 1e3
            outs = None
            for noise in ("gaussian", "rademacher"):
                variants = {
                    "inplace-RN": lambda: F.perturb_(xs, 1, 1e-3, noise=noise, backend=backend),
                    "inplace-SR": lambda: F.perturb_(xs, 1, 1e-3, noise=noise, rounding_seed=5, backend=backend),
                }
                if label != "1GiB-tensor" or dtype != torch.float32:
                    if outs is None:
                        outs = [torch.empty_like(x) for x in xs]
                    variants["out-of-place"] = lambda: F.perturbed(xs, 1, 1e-3, out=outs, noise=noise,
                                                                   backend=backend)
                for name, fn in variants.items():
                    ms = statistics.median(time_ms(fn, device, 3, reps))
                    rows.append(dict(shapes=label, dtype=dname, noise=noise, variant=name, ms=ms,
                                     floor_ms=floor_ms, x_floor=ms / floor_ms, host_ms=host_ms(fn, device),
                                     tensors=len(xs)))
                    print(f"{label:12s} {dname:9s} {noise:10s} {name:13s} {ms:8.3f} ms  "
                          f"{ms / floor_ms:5.2f}x floor ({floor_ms:.3f})  host {rows[-1]['host_ms']:.3f} ms",
                          flush=True)
            del xs, outs
            free_memory(device)
    return bw, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="opt-1.3b,opt-13b")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--backend", default="triton", choices=["triton", "native"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: bench.bench_variants times compiled kernels on a GPU")
    device = torch.device("cuda")
    env = environment(device)
    print({k: env.get(k) for k in ("gpu", "torch", "triton", "commit")})
    check_variants(device, args.backend)
    print("variants agree with the oracle")
    bw, _ = run(args.models.split(","), args.dtypes.split(","), device, args.backend, args.reps)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s")


if __name__ == "__main__":
    main()
