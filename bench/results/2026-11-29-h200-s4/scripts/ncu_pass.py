"""One 1 GiB fp16 tensor: 2 Gaussian passes, 2 Rademacher passes (for ncu)."""
import torch
from fastmezo import functional as F
x = torch.randn(1 << 29, device="cuda").half()
for noise in ("gaussian", "rademacher"):
    for i in range(2):
        F.perturb_([x], 123 + i, 1e-3, noise=noise)
torch.cuda.synchronize()
