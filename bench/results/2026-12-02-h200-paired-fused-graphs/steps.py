"""After the one-launch split sum: 1x128 / 1x64 fused (graphed, eager) vs copies, reference; per-layer."""
import gc, json, sys, time, torch
from triton.testing import do_bench
import fastmezo
from fastmezo import paired_linear as policy
from bench.models import build_model, make_batch, make_closure
from bench.bench_paired import user_ms, _private_pool_bytes, SEED, EPS
from bench.step_variants import BaselineStepper
ws = policy._kernel("paired_linear_ws")[0]
dev = torch.device("cuda")
out = sys.argv[1]
x = torch.randn(8192, 8192, device=dev, dtype=torch.half)
t0 = time.time()
while time.time() - t0 < 3: x @ x          # clocks up before the per-layer timings
torch.cuda.synchronize(); del x
layers = {}
for name, (n, k) in {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480), "lm_head": (50272, 5120)}.items():
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    x = torch.randn(256, k, device="cuda").half()
    r = {}
    for st, wst in ((3, 4), (2, 6), (3, 4), (2, 6)):
        ws.STAGES, ws.W_STAGES = st, wst
        r.setdefault(f"st{st}w{wst}", []).append(do_bench(lambda: ws.paired_linear(x, w, 1e-3, SEED, 5, 0, 0), rep=200) * 1e3)
    ws.STAGES, ws.W_STAGES = 3, 4
    r["cublas"] = do_bench(lambda: (x[:128] @ w.T, x[128:] @ w.T), rep=200) * 1e3
    layers[name] = r; print(name, r, flush=True)
    del w, x
model = build_model("opt-13b", torch.float16, dev)
model_bytes = torch.cuda.memory_allocated(dev)
res = []
def measure(name, fn, reps=7, warm=4, **extra):
    gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    ms = user_ms(fn, dev, warm, reps)
    r = dict(name=name, ms=ms, peak=(torch.cuda.max_memory_allocated(dev) - model_bytes) / 2**20,
             reserved=(torch.cuda.max_memory_reserved(dev) - model_bytes) / 2**20, pool=_private_pool_bytes() / 2**20, **extra)
    res.append(r); print(json.dumps(r), flush=True)
    return r
def paired(name, b, t, fused, graphs=True):
    ids = make_batch(model.config.vocab_size, b, t, dev)
    with fastmezo.patch(model, lr=1e-7, eps=EPS, seed=SEED, mode="paired", fused=fused, cuda_graphs=graphs) as h:
        h.step({"input_ids": ids, "labels": ids})
        paths = {}
        for v in h.paired.paths.values(): paths[v] = paths.get(v, 0) + 1
        r = measure(name, lambda: h.step({"input_ids": ids, "labels": ids}), cfg=f"{b}x{t}", paths=paths)
        g = h.graphs
        r.update(graphs=f"{g.captured}/{g.replayed}/{g.failed}" if g is not None else "")
for b, t in ((1, 128), (1, 64)):
    ids = make_batch(model.config.vocab_size, b, t, dev)
    closure = make_closure(model, ids)
    with torch.no_grad():
        measure("forward", lambda: float(closure()), cfg=f"{b}x{t}")
    paired("fused-graphs", b, t, True)
    paired("copies-graphs", b, t, False)
    if b == 1 and t == 128:
        paired("fused-eager", b, t, True, graphs=False)
        paired("copies-eager", b, t, False, graphs=False)
        ref = BaselineStepper(model)
        measure("reference", lambda: ref.step(closure), reps=5, warm=2, cfg="1x128")
        del ref
json.dump(dict(layers=layers, steps=res), open(f"{out}/exp2.json", "w"), indent=1)
print("| name | cfg | ms | peak MiB | reserved MiB | pool MiB | graphs |")
for r in res:
    print(f"| {r['name']} | {r['cfg']} | {r['ms']:.1f} | {r['peak']:.0f} | {r['reserved']:.0f} | {r['pool']:.0f} | {r.get('graphs','')} |")
