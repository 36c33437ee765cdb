"""Block size / warps sweep of the table kernel on the H200 (bit-identity against the default checked)."""
import sys, torch, triton
sys.path.insert(0, "bench")
from shapes import opt_param_shapes
from fastmezo.kernels import axpbz as K
dev = "cuda"
big = [torch.randn(1 << 29, device=dev).half()]
g = torch.Generator(device=dev).manual_seed(0)
m13 = [torch.empty(s, device=dev, dtype=torch.float16).normal_(0, 0.02, generator=g) for _, s in opt_param_shapes("opt-13b")]
floor = {}
def copy_ms(ts):
    outs = [torch.empty_like(t) for t in ts]
    def f():
        for t, o in zip(ts, outs):
            o.copy_(t)
    return triton.testing.do_bench(f, warmup=5, rep=50)
floor["1GiB"] = copy_ms(big)
floor["13b"] = sum(t.numel() for t in m13) * 4 / (big[0].numel() * 4 / floor["1GiB"])
CONFIGS = [(4096, 4), (4096, 8), (2048, 4), (2048, 8), (1024, 4), (1024, 2), (8192, 8), (8192, 16), (4096, 16)]
print("copy floor ms", floor)
for noise in (0, 1):
    for rnd in (None, 99):
        ref = big[0].clone()
        K.axpbz_multi_([ref], 1.0, 1e-3, 5, [3], noise, round_seed=rnd)
        for block, warps in CONFIGS:
            x = big[0].clone()
            K.axpbz_multi_([x], 1.0, 1e-3, 5, [3], noise, round_seed=rnd, block=block, num_warps=warps)
            same = torch.equal(x, ref)
            res = []
            for name, ts in (("1GiB", big), ("13b", m13)):
                keys = list(range(len(ts)))
                ms = triton.testing.do_bench(lambda: K.axpbz_multi_(ts, 1.0, 1e-9, 5, keys, noise, round_seed=rnd, block=block, num_warps=warps), warmup=3, rep=60)
                res.append(f"{name} {ms:7.3f} ms {ms / floor[name]:5.2f}x")
            print(f"{'gauss' if noise == 0 else 'radem'} {'SR' if rnd else 'RN'} BLOCK {block:5d} warps {warps:2d} same={same}  " + "  ".join(res), flush=True)
