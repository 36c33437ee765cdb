"""16x256: a batched matmul for biased linears (bias filled into the output, then baddbmm with beta 1) vs a
matmul per half with the bias in cuBLAS's epilogue; per-layer microbench then whole steps; SM clocks sampled."""
import gc, json, subprocess, sys, time, torch
from pathlib import Path
import fastmezo
from fastmezo import paired_linear as policy
from bench.models import build_model, make_batch, make_closure
from bench.bench_paired import user_ms, SEED, EPS
from bench.step_variants import BaselineStepper
out_dir = sys.argv[1]
sys.path.insert(0, str(Path(__file__).parent)); from fillk import fill   # beside this script
dev = torch.device("cuda")
x = torch.randn(8192, 8192, device=dev, dtype=torch.half)
t0 = time.time()
while time.time() - t0 < 3: x @ x
del x
from triton.testing import do_bench
layers = []
for name, (n, k) in {"q_proj": (5120, 5120), "fc1": (20480, 5120), "fc2": (5120, 20480)}.items():
    w2 = (torch.randn(2, n, k, device=dev) * 0.02).half(); b2 = (torch.randn(2, n, device=dev) * 0.1).half()
    x3 = torch.randn(2, 4096, k, device=dev).half(); out = torch.empty(2, 4096, n, device=dev, dtype=torch.half)
    def halves():
        for h in range(2): torch.addmm(b2[h], x3[h], w2[h].t(), out=out[h])
    def bmm_nobias(): torch.bmm(x3, w2.transpose(1, 2), out=out)
    def copy_baddbmm(): out.copy_(b2[:, None, :].expand_as(out)); out.baddbmm_(x3, w2.transpose(1, 2))
    def fill_baddbmm(): fill(out, b2); out.baddbmm_(x3, w2.transpose(1, 2))
    def fill_only(): fill(out, b2)
    def copy_only(): out.copy_(b2[:, None, :].expand_as(out))
    halves(); ref = out.clone(); fill_baddbmm()
    r = dict(layer=name, maxdiff=(out.float() - ref.float()).abs().max().item(), frac_differ=(out != ref).float().mean().item())
    for fn in (halves, bmm_nobias, copy_baddbmm, fill_baddbmm, fill_only, copy_only, halves, fill_baddbmm):
        r[fn.__name__] = min(r.get(fn.__name__, 1e9), do_bench(fn, warmup=50, rep=300) * 1e3)
    layers.append(r); print(json.dumps(r), flush=True)
    del w2, b2, x3, out, ref
orig = policy._matmul
def batched(x3, w2, b2, out, when=lambda k, n: True):
    if b2 is None or not when(w2.shape[2], w2.shape[1]):
        return orig(x3, w2, b2, out)
    out.copy_((b2[:, None, :] if b2.dim() == 2 else b2[None, None, :]).expand_as(out))
    out.baddbmm_(x3, w2.transpose(1, 2))
variants = {"paired": orig, "paired-bmm-all": batched,
            "paired-bmm-fc2": lambda *a: batched(*a, when=lambda k, n: k > n)}
model = build_model("opt-13b", torch.float16, dev)
model_bytes = torch.cuda.memory_allocated(dev)
res = []
def measure(name, cfg, fn, reps=9, warm=4):
    gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    ms = user_ms(fn, dev, warm, reps)
    smi.terminate(); samples = [l.split(",") for l in smi.communicate()[0].splitlines() if "," in l]
    clk = sorted(float(a) for a, _ in samples); pw = sorted(float(b) for _, b in samples)
    r = dict(name=name, cfg=cfg, ms=ms, peak=(torch.cuda.max_memory_allocated(dev) - model_bytes) / 2**20,
             sm_clock_median=clk[len(clk) // 2] if clk else None, power_median=pw[len(pw) // 2] if pw else None)
    res.append(r); print(json.dumps(r), flush=True)
b, t = 16, 256
ids = make_batch(model.config.vocab_size, b, t, dev)
closure = make_closure(model, ids)
with torch.no_grad():
    measure("forward", "16x256", lambda: float(closure()))
for rnd in range(2):
    ref = BaselineStepper(model)
    measure("reference", "16x256", lambda: ref.step(closure), reps=7, warm=2)
    del ref
    for name, fn in variants.items():
        policy._matmul = fn
        with fastmezo.patch(model, lr=1e-7, eps=EPS, seed=SEED, mode="paired") as h:
            h.step({"input_ids": ids, "labels": ids})
            measure(name, "16x256", lambda: h.step({"input_ids": ids, "labels": ids}))
        policy._matmul = orig
json.dump(dict(layers=layers, steps=res), open(f"{out_dir}/exp4.json", "w"), indent=1)
print("| layer | halves us | bmm no bias | copy+baddbmm | fill+baddbmm | fill | copy | max diff | frac differ |")
for r in layers:
    print(f"| {r['layer']} | {r['halves']:.0f} | {r['bmm_nobias']:.0f} | {r['copy_baddbmm']:.0f} | {r['fill_baddbmm']:.0f} | {r['fill_only']:.0f} | {r['copy_only']:.0f} | {r['maxdiff']:.3g} | {r['frac_differ']:.3g} |")
print("| step | ms | vs reference before | peak MiB | SM MHz | W |")
last = None
for r in res:
    if r["name"] == "reference": last = r["ms"]
    print(f"| {r['name']} | {r['ms']:.2f} | {'' if r['name'] in ('reference', 'forward') else f'{last / r[chr(109)+chr(115)]:.3f}x'} | {r['peak']:.0f} | {r['sm_clock_median']} | {r['power_median']} |")
