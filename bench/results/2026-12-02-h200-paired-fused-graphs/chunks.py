"""Paired mode's memory and time on OPT-13B fp16 (1x128, 16x256): the loss chunk x the fused path (graphed,
eager, at most 4 or 1 splits of K) x the copies; a forward with transformers' loss and the reference.
Run from the repository root: PYTHONPATH=. python3 <this file> <out.json>"""
import gc, json, sys, time, torch
import fastmezo, fastmezo.paired_batch as pb
from fastmezo import paired_linear as policy
from bench.models import build_model, make_batch, make_closure
from bench.bench_paired import user_ms, _private_pool_bytes, SEED, EPS
from bench.step_variants import BaselineStepper
ws = policy._kernel("paired_linear_ws")[0]
dev = torch.device("cuda")
model = build_model("opt-13b", torch.float16, dev)
model_bytes = torch.cuda.memory_allocated(dev)
res = []
def free():
    gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache()
def measure(name, fn, reps=7, warm=4, **extra):
    free(); torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.time()
    ms = user_ms(fn, dev, warm, reps)
    r = dict(name=name, ms=ms, peak=(torch.cuda.max_memory_allocated(dev) - model_bytes) / 2**20,
             reserved=(torch.cuda.max_memory_reserved(dev) - model_bytes) / 2**20, pool=_private_pool_bytes() / 2**20,
             wall=time.time() - t0, **extra)
    res.append(r); print(json.dumps(r), flush=True)
    return r
def paired(name, b, t, chunk, fused, graphs=True, split=4, reps=7):
    pb.LOSS_CHUNK_BYTES = chunk << 20
    ws.MAX_SPLIT = split
    ids = make_batch(model.config.vocab_size, b, t, dev)
    with fastmezo.patch(model, lr=1e-7, eps=EPS, seed=SEED, mode="paired", fused=fused, cuda_graphs=graphs) as h:
        h.step({"input_ids": ids, "labels": ids})
        paths = {}
        for v in h.paired.paths.values(): paths[v] = paths.get(v, 0) + 1
        r = measure(name, lambda: h.step({"input_ids": ids, "labels": ids}), reps=reps, cfg=f"{b}x{t}", chunk=chunk,
                    split=split, paths=paths, loss=h.optimizer.loss_plus)
        g = h.graphs
        if g is not None: r.update(captured=g.captured, replayed=g.replayed, failed=g.failed)
        print("   graphs", r.get("captured"), r.get("replayed"), r.get("failed"), flush=True)
    pb.LOSS_CHUNK_BYTES = 1 << 28; ws.MAX_SPLIT = 4
for b, t in ((1, 128), (16, 256)):
    ids = make_batch(model.config.vocab_size, b, t, dev)
    closure = make_closure(model, ids)
    with torch.no_grad():
        measure("forward", lambda: float(closure()), cfg=f"{b}x{t}")
    if b == 1:
        for chunk in (256, 32, 8):
            paired(f"fused-graphs", 1, 128, chunk, True)
        paired("fused-graphs", 1, 128, 8, True, split=1)
        paired("fused-eager", 1, 128, 8, True, graphs=False)
        paired("copies", 1, 128, 256, False)
        paired("copies", 1, 128, 8, False)
        paired("fused-graphs", 2, 128, 8, True)
        paired("copies", 2, 128, 8, False)
        paired("fused-graphs", 1, 64, 8, True)
        paired("copies", 1, 64, 8, False)
        ref = BaselineStepper(model)
        measure("reference", lambda: ref.step(closure), reps=5, warm=2, cfg="1x128")
        del ref
    else:
        paired("copies", 16, 256, 256, False, reps=5)
        paired("copies", 16, 256, 8, False, reps=5)
json.dump(res, open(sys.argv[1], "w"), indent=1)
print("| name | cfg | chunk | split | ms | peak MiB | reserved MiB | pool MiB | graphs |")
for r in res:
    print(f"| {r['name']} | {r['cfg']} | {r.get('chunk','')} | {r.get('split','')} | {r['ms']:.1f} | {r['peak']:.0f} | {r['reserved']:.0f} | {r['pool']:.0f} | {r.get('captured','')}/{r.get('replayed','')}/{r.get('failed','')} |")
