"""Stochastic rounding at other (BLOCK, num_warps) than the default, against the torch oracle (on CUDA)."""
import torch
from fastmezo import reference as R
from fastmezo.kernels import axpbz as K
n = (1 << 20) + 77
for dtype in (torch.float16, torch.bfloat16):
    for noise in (0, 1):
        x0 = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype).cuda()
        ref = x0.clone()
        R.axpbz_(ref, 1.0, 1e-3, 5, 3, R.Noise(noise) if hasattr(R, "Noise") else noise, round_seed=99)
        dflt = x0.clone()
        K.axpbz_multi_([dflt], 1.0, 1e-3, 5, [3], noise, round_seed=99)
        for block, warps in [(4096, 4), (4096, 8), (2048, 4), (1024, 2), (8192, 8)]:
            x = x0.clone()
            K.axpbz_multi_([x], 1.0, 1e-3, 5, [3], noise, round_seed=99, block=block, num_warps=warps)
            print("   vs default config: differs on", int((x != dflt).sum()), flush=True)
            bad = (x != ref)
            print(dtype, "gauss" if noise == 0 else "radem", block, warps, "differs from the oracle on",
                  int(bad.sum()), "of", n, "first at", bad.nonzero().flatten()[:6].tolist(),
                  "(index % BLOCK:", [i % block for i in bad.nonzero().flatten()[:6].tolist()], ")", flush=True)
