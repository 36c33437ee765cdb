"""Whole-step A/B of the Hopper kernel's rings (STAGES/W_STAGES 3/4 vs 2/6) at 1x128, and 16x256 repeats."""
import gc, json, sys, time, torch
import fastmezo
from fastmezo import paired_linear as policy
from bench.models import build_model, make_batch, make_closure
from bench.bench_paired import user_ms, SEED, EPS
from bench.step_variants import BaselineStepper
ws = policy._kernel("paired_linear_ws")[0]
dev = torch.device("cuda")
out = sys.argv[1]
model = build_model("opt-13b", torch.float16, dev)
model_bytes = torch.cuda.memory_allocated(dev)
res = []
def measure(name, cfg, fn, reps=9, warm=4, **extra):
    gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    ms = user_ms(fn, dev, warm, reps)
    r = dict(name=name, cfg=cfg, ms=ms, peak=(torch.cuda.max_memory_allocated(dev) - model_bytes) / 2**20, **extra)
    res.append(r); print(json.dumps(r), flush=True)
def paired(name, b, t, reps=9):
    ids = make_batch(model.config.vocab_size, b, t, dev)
    with fastmezo.patch(model, lr=1e-7, eps=EPS, seed=SEED, mode="paired") as h:
        h.step({"input_ids": ids, "labels": ids})
        measure(name, f"{b}x{t}", lambda: h.step({"input_ids": ids, "labels": ids}), reps=reps)
def reference(b, t, reps):
    ids = make_batch(model.config.vocab_size, b, t, dev)
    closure = make_closure(model, ids)
    ref = BaselineStepper(model)
    measure("reference", f"{b}x{t}", lambda: ref.step(closure), reps=reps, warm=2)
for rnd in range(2):
    for st, wst in ((3, 4), (2, 6)):
        ws.STAGES, ws.W_STAGES = st, wst
        paired(f"paired-st{st}w{wst}", 1, 128, reps=15)
ws.STAGES, ws.W_STAGES = 3, 4
reference(1, 128, 7)
t0 = time.time()
for rnd in range(2):
    reference(16, 256, 7)
    paired("paired", 16, 256, reps=9)
    print("16x256 round", rnd, time.time() - t0, flush=True)
json.dump(res, open(f"{out}/exp3.json", "w"), indent=1)
ref = {r["cfg"]: r["ms"] for r in res if r["name"] == "reference"}
print("| name | cfg | ms | peak MiB | vs last reference of cfg |")
last = {}
for r in res:
    if r["name"] == "reference": last[r["cfg"]] = r["ms"]
    vs = last.get(r["cfg"]) or ref[r["cfg"]]
    print(f"| {r['name']} | {r['cfg']} | {r['ms']:.2f} | {r['peak']:.0f} | {vs / r['ms']:.3f}x |" if r["name"] != "reference" else f"| reference | {r['cfg']} | {r['ms']:.2f} | {r['peak']:.0f} | |")
