"""Per-layer times of paired mode's fused kernels, kept beside their output (run from the repository root):
the warp-specialized kernel (automatic split and one split) against the Triton fused kernel, cuBLAS on
both halves and a normal_ fill of W, OPT-13B shapes at 2 x 128 rows, float16."""
import sys, json, torch
from triton.testing import do_bench
import fastmezo.kernels.paired_linear as pl
import fastmezo.kernels.paired_linear_ws as ws
SEED = 0x0123456789ABCDEF
shapes = {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480), "lm_head": (50272, 5120)}
res = {}
print(f"{'layer':8s} {'cublas':>8s} {'normal_':>8s} {'triton':>8s} {'ws-auto':>8s} {'ws-1':>8s}  (us)")
for name, (n, k) in shapes.items():
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    x = torch.randn(256, k, device="cuda").half()
    r = dict(cublas=do_bench(lambda: (x[:128] @ w.T, x[128:] @ w.T), rep=300),
             normal_=do_bench(lambda: torch.empty_like(w).normal_(), rep=300),
             triton=do_bench(lambda: pl.paired_linear(x, w, 1e-3, SEED, 5, 0, 0), rep=300),
             ws_auto=do_bench(lambda: ws.paired_linear(x, w, 1e-3, SEED, 5, 0, 0), rep=300),
             ws_1=do_bench(lambda: ws.paired_linear(x, w, 1e-3, SEED, 5, 0, 0, split=1), rep=300))
    res[name] = r
    print(f"{name:8s} " + " ".join(f"{v * 1e3:8.1f}" for v in r.values()), flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
