"""Where a 1x128 fused-graphs step's time goes (torch.profiler), and per-layer variants of the Hopper kernel."""
import gc, json, sys, os, torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench
import fastmezo, fastmezo.paired_batch as pb
from fastmezo import paired_linear as policy
from bench.models import build_model, make_batch
ws = policy._kernel("paired_linear_ws")[0]
out = sys.argv[1]
dev = torch.device("cuda")
SEED = 0x0123456789ABCDEF
res = {}
shapes = {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480), "lm_head": (50272, 5120)}
for name, (n, k) in shapes.items():
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    x = torch.randn(256, k, device="cuda").half()
    r = {}
    for split in (None, 1, 2, 3, 4, 6):
        r[f"split{split}"] = do_bench(lambda: ws.paired_linear(x, w, 1e-3, SEED, 5, 0, 0, split=split), rep=200) * 1e3
    for st, wst in ((2, 6), (4, 4), (3, 6), (2, 4)):
        ws.STAGES, ws.W_STAGES = st, wst
        try:
            r[f"st{st}w{wst}"] = do_bench(lambda: ws.paired_linear(x, w, 1e-3, SEED, 5, 0, 0), rep=200) * 1e3
        except Exception as e:
            r[f"st{st}w{wst}"] = str(e)[:80]
    ws.STAGES, ws.W_STAGES = 3, 4
    res[name] = r
    print(name, {a: (round(b, 1) if isinstance(b, float) else b) for a, b in r.items()}, flush=True)
    del w, x
json.dump(res, open(f"{out}/layers.json", "w"), indent=1)
model = build_model("opt-13b", torch.float16, dev)
ids = make_batch(model.config.vocab_size, 1, 128, dev)
pb.LOSS_CHUNK_BYTES = 8 << 20
for what, fused in (("fused", True), ("copies", False)):
    with fastmezo.patch(model, lr=1e-7, eps=1e-3, seed=1, mode="paired", fused=fused) as h:
        for _ in range(5):
            h.step({"input_ids": ids, "labels": ids})
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            h.step({"input_ids": ids, "labels": ids})
            torch.cuda.synchronize()
        print(what, "graphs", h.graphs.captured, h.graphs.replayed, flush=True)
        prof.export_chrome_trace(f"{out}/trace_{what}.json")
        open(f"{out}/table_{what}.txt", "w").write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40))
    gc.collect(); torch.cuda.empty_cache()
