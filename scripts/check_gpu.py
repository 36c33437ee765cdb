"""Quick check of the Triton kernels on a CUDA GPU: agreement with the torch oracle (all dtypes, odd
sizes, shard offsets, a tensor of more than 2**31 elements) and a first bandwidth figure for one fused
pass. Prints a table; exits non-zero on any disagreement.

    python scripts/check_gpu.py [--big] [--backends triton,native]
    (--big adds the 2**31 + 5 element fp16 tensor, 4.3 GB; backends default: triton, plus native when
    fastmezo._C was built with CUDA kernels)
"""
import argparse
import sys

import torch

import fastmezo
from fastmezo import functional as F
from fastmezo import reference as R


def _bench(fn, reps=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--backends", default=None)
    args = parser.parse_args()
    from fastmezo import backends as B
    names = args.backends.split(",") if args.backends else [
        b for b in ("triton", "native") if B.unavailable_reason(b, torch.device("cuda")) is None]
    import triton
    dev = "cuda"
    print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"fastmezo {fastmezo.__version__}")
    failures = 0
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for backend in names:
        for noise in ("gaussian", "rademacher"):
            for n, offset in ((1, 0), (127, 3), (4097, 0), (1 << 20, 5), (333_333, (1 << 32) - 7)):
                z = F.make_noise(n, 0xDEADBEEF12345678, 11, noise=noise, offset=offset, device=dev, backend=backend)
                zr = R.noise(n, 0xDEADBEEF12345678, 11, noise, offset, device=dev)
                err = ((z - zr).abs() / (1 + zr.abs())).max().item()
                ok = err == 0 if noise == "rademacher" else err <= 1e-5
                failures += not ok
                rows.append((f"{backend} noise {noise}", n, offset, f"{err:.2e}", "ok" if ok else "FAIL"))
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = (torch.randn(100_003, generator=gen, device=dev) * 0.02).to(dtype)
                y = x.clone()
                F.axpbz_([x], 0.999, -3e-3, 77, noise=noise, backend=backend)
                F.axpbz_([y], 0.999, -3e-3, 77, noise=noise, backend="reference")
                diff = (x.float() - y.float()).abs()
                if dtype == torch.float32:
                    ok = (diff <= 1e-6 * (1 + y.float().abs())).all().item()
                else:
                    spacing = torch.finfo(dtype).eps * y.float().abs().clamp(min=torch.finfo(dtype).tiny)
                    ok = (diff <= 2 * spacing + 1e-12).all().item()
                failures += not ok
                rows.append((f"{backend} axpbz {noise} {str(dtype)[6:]}", x.numel(), 0, f"{diff.max().item():.2e}",
                             "ok" if ok else "FAIL"))
    if args.big:
        n = (1 << 31) + 5
        x = torch.zeros(n, dtype=torch.float16, device=dev)
        idx = torch.tensor([0, (1 << 31) - 1, 1 << 31, n - 1], device=dev)
        want = R.noise_at(idx, 1234, 0, "gaussian").half()
        for backend in names:
            x.zero_()
            F.perturb_([x], 1234, 1.0, backend=backend)
            got = x[idx]
            ok = torch.allclose(got.float(), want.float(), atol=2e-3, rtol=1e-3)
            failures += not ok
            rows.append((f"{backend} 2**31+5 elements fp16", n, 0,
                         f"{(got.float() - want.float()).abs().max().item():.2e}", "ok" if ok else "FAIL"))
        del x

    # One pass over a 1 GiB fp16 tensor against a plain copy (the floor) and the reference way.
    n = 1 << 29
    x = torch.randn(n, device=dev, dtype=torch.float16)
    y = torch.empty_like(x)
    copy_ms = _bench(lambda: y.copy_(x))
    gb = 2 * x.numel() * x.element_size() / 1e9
    timing = [("copy (floor)", copy_ms)]
    for backend in names:
        for noise in ("gaussian", "rademacher"):
            timing.append((f"{backend} perturb {noise}",
                           _bench(lambda: F.perturb_([x], 1, 1e-3, noise=noise, backend=backend))))

    def reference_way():
        torch.manual_seed(1)
        z = torch.normal(mean=0, std=1, size=x.size(), device=dev, dtype=x.dtype)
        return x + 1e-3 * z
    timing.append(("reference way (manual_seed+normal+add)", _bench(reference_way)))

    print(f"\n{'check':42s} {'numel':>12s} {'offset':>12s} {'max rel err':>12s}  result")
    for r in rows:
        print(f"{r[0]:42s} {r[1]:12d} {r[2]:12d} {r[3]:>12s}  {r[4]}")
    print(f"\n{'pass over 2^29 fp16 (1 GiB)':40s} {'ms':>8s} {'x floor':>8s} {'TB/s':>8s}")
    for name, ms in timing:
        print(f"{name:40s} {ms:8.3f} {ms / copy_ms:8.2f} {gb / ms:8.2f}")
    print("\nFAILURES:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
