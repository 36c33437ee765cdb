"""Paired step against the copy budget (MAX_COPY_BYTES) and the loss chunk, OPT-13B fp16 (H200)."""
import sys, gc
sys.path.insert(0, ".")
import torch, fastmezo
from fastmezo import paired_copies, paired_batch
from bench.models import build_model, make_batch, make_closure
from bench.bench_paired import user_ms, _private_pool_bytes
dev = torch.device("cuda")
model = build_model("opt-13b", torch.float16, dev)
base = torch.cuda.memory_allocated(dev)
MiB = 1 << 20
rows = []
for B, T in ((1, 128), (16, 256)):
    ids = make_batch(model.config.vocab_size, B, T, dev)
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        clo = make_closure(model, ids)
        gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
        ms = user_ms(lambda: float(clo()), dev, 2, 5)
        rows.append((f"{B}x{T}", "forward", "", ms, (torch.cuda.max_memory_allocated(dev) - base) / MiB,
                     (torch.cuda.max_memory_reserved(dev) - base) / MiB, 0))
    for budget, chunk in ((256, 256), (64, 64), (32, 32), (16, 16)) if B == 1 else ((256, 256), (64, 64), (32, 32)):
        paired_copies.MAX_COPY_BYTES = budget * MiB
        paired_batch.LOSS_CHUNK_BYTES = chunk * MiB
        for graphs in ((True, False) if B == 1 else (False,)):
            gc.collect(); torch.cuda.empty_cache()
            with fastmezo.patch(model, lr=1e-7, eps=1e-3, seed=1, mode="paired", cuda_graphs=graphs) as h:
                h.step(batch)
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(dev)
                ms = user_ms(lambda: h.step(batch), dev, 3, 5)
                pool = _private_pool_bytes() / MiB
                rows.append((f"{B}x{T}", f"paired budget {budget} chunk {chunk}", "graphs" if graphs else "eager", ms,
                             (torch.cuda.max_memory_allocated(dev) - base) / MiB,
                             (torch.cuda.max_memory_reserved(dev) - base) / MiB, pool))
            del h
            print(rows[-1], flush=True)
print("\n| config | step | graphs | ms | peak allocated above model MiB | peak reserved MiB | graph pool MiB |")
print("|---|---|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.0f} |")
