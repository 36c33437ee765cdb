"""Where exact mode's host time goes at 1x128 (OPT-1.3B fp16): torch.profiler over 3 steps."""
import sys, time, torch
sys.path.insert(0, "bench")
import bench_steps as BS
import fastmezo
from fastmezo.kernels import axpbz as K
dev = torch.device("cuda")
model = BS.build_model("opt-1.3b", torch.float16, dev, log=lambda *a: None)
ids = BS.make_batch(model.config.vocab_size, 1, 128, dev)
closure = BS.make_closure(model, ids)
for gb in (None, 0):
    with fastmezo.patch(model, mode="exact", lr=1e-7, eps=1e-3, seed=1, group_bytes=gb, stochastic_rounding=False) as h:
        for _ in range(4):
            h.optimizer.step(closure)
        torch.cuda.synchronize()
        m0 = K._tables.misses
        t = time.perf_counter()
        for _ in range(5):
            h.optimizer.step(closure)
        torch.cuda.synchronize()
        print(f"group_bytes={gb} hooked={len(h.exact.groups)} step {(time.perf_counter() - t) / 5 * 1e3:.2f} ms, table misses in 5 steps {K._tables.misses - m0}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                h.optimizer.step(closure)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
        # host time of one pre-hook, no GPU wait: time the hooks alone over a plain forward
        with torch.no_grad():
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(5):
                closure()
            torch.cuda.synchronize(); fwd = (time.perf_counter() - t) / 5 * 1e3
        print(f"plain forward {fwd:.2f} ms")
