"""A small workload of the native CUDA kernels for compute-sanitizer (memcheck): every dtype, both
noises, odd sizes, unaligned offsets and storage offsets, many tensors in one call (several launch
tables), and the noise-fill path. Run as
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_native.py
"""
import torch

from fastmezo import functional as F

sizes = [1, 3, 5, 127, 129, 4097, 70_001]
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for noise in ("gaussian", "rademacher"):
        buf = torch.randn(sum(sizes) + 40, device="cuda").to(dtype)
        views, start = [], 1                       # storage offset 1: misaligned vector accesses
        for n in sizes:
            views.append(buf[start:start + n])
            start += n
        F.perturb_(views, 7, 1e-3, noise=noise, offsets=[0, 1, 2, 3, 5, 2 ** 32 + 1, 0], backend="native")
        many = [torch.randn(n, device="cuda").to(dtype) for n in sizes * 6]   # 42 tensors > one table
        F.restore_and_update_(many, 9, 1e-3, 1e-2, 0.5, weight_decay=0.1, noise=noise, backend="native")
        F.make_noise(1001, 3, 2, noise=noise, offset=5, device="cuda", dtype=dtype, backend="native")
torch.cuda.synchronize()
print("sanitize workload done")
