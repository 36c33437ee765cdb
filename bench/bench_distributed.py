"""Data-parallel and FSDP2 MeZO steps on torch.distributed: step time, scaling over ranks, bytes
communicated per step, and what the distributed path costs at world size 1.

    python -m bench.bench_distributed --worlds 1,2 [--model opt-13b] [--dtype float16]
        [--configs 16x256,1x128] [--reference] [--fsdp] [--fsdp-check] [--warmup N] [--reps N]
        [--out DIR] [--smoke]

Without torchrun's environment the script is the driver: for each world size of ``--worlds`` it runs
``torchrun --standalone --nproc-per-node W -m bench.bench_distributed ...`` (the same options) and
writes one JSON with every world's rows plus the scaling (samples/s at W over W x samples/s at 1).
Under torchrun each rank builds the model on its GPU (NCCL; on CPUs gloo, --smoke only) and, per
batch configuration (per-rank batch x tokens, random ids, each rank its own):

  * ``plain``  (world size 1 only): fastmezo.patch's step, no process group involved;
  * ``dp``: the same step after fastmezo.data_parallel (one all-reduce of three float64 a step);
    at world size 1 ``dp_overhead`` = the median over --blocks alternating block pairs of dp / plain - 1
    (with its quartiles), and ``dp_path_cost`` = what the path adds to a step, measured on a
    16-parameter model where it is not lost in the noise (``path_cost``), over the plain step;
  * ``reference`` (--reference): the paper's way in each rank (bench/baseline.py: torch.manual_seed +
    torch.normal per tensor, out of place, four passes) plus the same all-reduce of the losses;
  * ``fsdp`` (--fsdp): the model sharded with fully_shard (each decoder layer, then the root), same
    step; --fsdp-check then replays the FSDP steps' losses on rank 0 in one unsharded process
    (rebuilt from the same seed) and compares every gathered weight bit for bit.

Reported: median step ms over --reps after --warmup (CUDA events), samples/s = world x batch / step,
the bytes each rank put into fastmezo's all-reduces per step (``comm_bytes``), FSDP's all-gather
bytes per step (every forward gathers every parameter: 2 x (W-1)/W x parameter bytes received per
rank), peak memory per GPU, and whether the replicas' checksums agree at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from . import common, models
from .baseline import baseline_perturb, baseline_update

LR, EPS, SEED = 1e-6, 1e-3, 0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2", help="world sizes the driver runs (comma-separated)")
    p.add_argument("--model", default="opt-13b", help="an OPT of bench/shapes.py, or llama2-70b (FSDP2 only)")
    p.add_argument("--dtype", default="float16", choices=list(common.DTYPES))
    p.add_argument("--configs", default="16x256,1x128", help="per-rank batch x tokens")
    p.add_argument("--reference", action="store_true", help="also time the paper's way of perturbing")
    p.add_argument("--fsdp", action="store_true", help="also time the model sharded with FSDP2")
    p.add_argument("--fsdp-check", action="store_true", help="FSDP2 steps against one process, bit for bit")
    p.add_argument("--check-steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--blocks", type=int, default=10, help="alternating plain / data-parallel blocks at world size 1")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="directory of the results (default bench/results/)")
    p.add_argument("--smoke", action="store_true", help="opt-tiny on CPUs with gloo; times mean nothing")
    args = p.parse_args(argv)
    if args.smoke:
        args.model = "llama-tiny" if args.model in LLAMA else "opt-tiny"
        args.dtype = "float32"
        args.configs = "2x16" if args.configs == p.get_default("configs") else args.configs
        args.warmup, args.reps, args.check_steps = 1, min(args.reps, 3), min(args.check_steps, 5)
    args.configs = [tuple(int(v) for v in c.split("x")) for c in common.split_list(args.configs)]
    return args


# -- one rank -------------------------------------------------------------------------------------
def _device(smoke: bool) -> torch.device:
    if torch.cuda.is_available() and not smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    if not smoke:
        raise SystemExit("no CUDA device: run with --smoke on CPUs")
    return torch.device("cpu")


#: Llama shapes, built only sharded (--model llama2-70b: about 138 GB in bf16, more than one GPU holds).
LLAMA = {"llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                            num_key_value_heads=8, vocab_size=32000),
         "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=1000)}


def _build_llama_sharded(name, dtype, device):
    """Llama of ``name``'s shapes: built on the meta device, sharded with fully_shard (each decoder
    layer, then the root), then only each rank's shards allocated and filled (N(0, 0.02), norms 1):
    no rank ever holds the whole model."""
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA[name], use_cache=False, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(SEED + dist.get_rank())
    with torch.no_grad():
        for n, p in model.named_parameters():
            local = p.to_local()
            local.fill_(1.0) if "norm" in n else local.normal_(0.0, 0.02, generator=gen)
    # The rotary frequencies are a buffer that to_empty left unfilled.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def _build(args, device, fsdp: bool):
    if args.model in LLAMA:
        return _build_llama_sharded(args.model, common.DTYPES[args.dtype], device)
    model = models.build_model(args.model, common.DTYPES[args.dtype], device, seed=SEED,
                               log=print if dist.get_rank() == 0 else (lambda *a: None))
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _timed(fn, device, args) -> float:
    return statistics.median(common.time_ms(fn, device, args.warmup, args.reps))


@torch.no_grad()
def _reference_step(model, ids, device, step):
    named = models.trainable(model)
    params, names = [p for _, p in named], [n for n, _ in named]
    closure = models.make_closure(model, ids)
    baseline_perturb(params, SEED + step, 1, EPS)
    plus = float(closure())
    baseline_perturb(params, SEED + step, -2, EPS)
    minus = float(closure())
    buf = torch.tensor([plus, minus], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    plus, minus = (buf / dist.get_world_size()).tolist()
    baseline_perturb(params, SEED + step, 1, EPS)
    baseline_update(params, SEED + step, LR, (plus - minus) / (2 * EPS), 0.0, names)


def _config_rows(args, model, device, batch, tokens, fsdp: bool):
    import fastmezo

    world, rank = dist.get_world_size(), dist.get_rank()
    ids = models.make_batch(model.config.vocab_size, batch, tokens, device, seed=rank)
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED)
    closure = models.make_closure(model, ids)
    step = lambda: handle.step(closure)  # noqa: E731
    row = dict(world=world, batch=batch, tokens=tokens, mode="fsdp" if fsdp else "dp")
    if world == 1 and not fsdp:
        plain, dp_times, ratios = [], [], []
        for _ in range(args.blocks):   # alternating blocks: drift of the clock or the GPU hits both alike
            plain.append(_timed(step, device, args))
            dp = fastmezo.data_parallel(handle)
            dp_times.append(_timed(step, device, args))
            dp.remove()
            ratios.append(dp_times[-1] / plain[-1] - 1)
        plain_ms, dp_ms = statistics.median(plain), statistics.median(dp_times)
        quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        row.update(plain_ms=plain_ms, dp_ms=dp_ms, dp_overhead=statistics.median(ratios),
                   dp_overhead_quartiles=[quart[0], quart[2]], blocks=args.blocks)
    dp = fastmezo.data_parallel(handle, model=model)
    step()                          # the agreement check's all-reduce is not a step's traffic
    sent = dp.comm_bytes
    ms = _timed(step, device, args)
    row.update(step_ms=ms, samples_per_s=world * batch * 1e3 / ms,
               comm_bytes=(dp.comm_bytes - sent) / (args.warmup + args.reps))
    if fsdp:
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        row["fsdp_allgather_bytes"] = 2 * (world - 1) / world * param_bytes
    else:
        try:
            dp.check_replicas()
            row["replicas_equal"] = True
        except fastmezo.distributed.ReplicaDivergence as exc:
            row["replicas_equal"] = str(exc)
    if args.reference and not fsdp:
        row["reference_ms"] = _timed(lambda: _reference_step(model, ids, device, 0), device, args)
        row["speedup_vs_reference"] = row["reference_ms"] / ms
    row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    dp.remove()
    handle.remove()
    return row


def _path_cost(device, blocks: int = 10, steps: int = 200) -> dict:
    """What the data-parallel path adds to a step, free of the big model's step-to-step noise: the same
    step on a 16-parameter model (its passes and forwards cost launches only), plain and through
    fastmezo.data_parallel, host wall time per step (every step ends with the losses on the host), in
    alternating blocks. The difference is the path's cost per step: the wrapped closure, the all-reduce
    of the losses and its copies to and from the device."""
    import time

    import fastmezo

    model = torch.nn.Linear(4, 4).to(device)
    x = torch.randn(2, 4, device=device)
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED)
    closure = lambda: model(x).square().mean()  # noqa: E731

    def per_step_us():
        for _ in range(10):
            handle.step(closure)
        t0 = time.perf_counter()
        for _ in range(steps):
            handle.step(closure)
        return (time.perf_counter() - t0) / steps * 1e6

    plain, dp = [], []
    for _ in range(blocks):
        plain.append(per_step_us())
        wrapped = fastmezo.data_parallel(handle)
        dp.append(per_step_us())
        wrapped.remove()
    handle.remove()
    diffs = [d - p for d, p in zip(dp, plain)]
    return dict(plain_us=statistics.median(plain), dp_us=statistics.median(dp), added_us=statistics.median(diffs),
                added_us_range=[min(diffs), max(diffs)], blocks=blocks, steps_per_block=steps)


def _fsdp_check(args, device):
    """--check-steps FSDP2 steps, then the same steps replayed (their all-reduced losses) on rank 0
    in one unsharded model from the same seed: every gathered weight must be bit-identical."""
    import fastmezo

    rank = dist.get_rank()
    batch, tokens = args.configs[-1]
    model = _build(args, device, fsdp=True)
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED)
    fastmezo.data_parallel(handle, model=model)
    ids = models.make_batch(model.config.vocab_size, batch, tokens, device, seed=rank)
    losses = []
    for _ in range(args.check_steps):
        handle.step(models.make_closure(model, ids))
        losses.append((handle.optimizer.loss_plus, handle.optimizer.loss_minus))
    replay = None
    if rank == 0:
        replay = models.build_model(args.model, common.DTYPES[args.dtype], device, seed=SEED, log=lambda *a: None)
        rh = fastmezo.patch(replay, lr=LR, eps=EPS, seed=SEED)
        for plus, minus in losses:
            it = iter((plus, minus))
            rh.step(lambda: next(it))
    replayed = dict(replay.named_parameters()) if replay is not None else {}
    differing = []
    for name, p in model.named_parameters():
        full = p.full_tensor()       # every rank takes part in the gather
        if rank == 0 and not torch.equal(full, replayed[name]):
            differing.append(name)
        del full
    return dict(steps=args.check_steps, tensors=len(list(model.parameters())), differing=differing,
                bit_identical=not differing)


def rank_main(args) -> None:
    device = _device(args.smoke)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu":
        torch.set_num_threads(1)
    result = dict(world=dist.get_world_size(), rows=[])
    modes = [True] if args.model in LLAMA else [False, True] if args.fsdp else [False]
    for fsdp in modes:
        model = _build(args, device, fsdp)
        for batch, tokens in args.configs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            result["rows"].append(_config_rows(args, model, device, batch, tokens, fsdp))
        del model
        common.free_memory(device)
    if args.fsdp_check and args.model not in LLAMA:
        result["fsdp_check"] = _fsdp_check(args, device)
    if result["world"] == 1:
        result["path_cost"] = cost = _path_cost(device, steps=20 if args.smoke else 200)
        for r in result["rows"]:
            if "plain_ms" in r:
                r["dp_path_cost"] = cost["added_us"] / (1e3 * r["plain_ms"])
    if dist.get_rank() == 0:
        result["environment"] = common.environment(device)
        common.write_json(Path(args.out), result)
    dist.destroy_process_group()


# -- the driver ----------------------------------------------------------------------------------
def _without_out(argv):
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        kept.append(a)
    return kept


def driver(args, argv) -> int:
    out_dir = Path(args.out) if args.out else common.RESULTS
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in common.split_list(args.worlds)):
            part = Path(tmp) / f"world{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "bench.bench_distributed", *_without_out(argv), "--out", str(part)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=common.REPO)
            runs.append(json.loads(part.read_text()))
    one = {(r["batch"], r["tokens"], r["mode"]): r["samples_per_s"] for r in runs[0]["rows"]}
    for run in runs:
        for r in run["rows"]:
            base = one.get((r["batch"], r["tokens"], r["mode"]))
            if base and runs[0]["world"] == 1:
                r["scaling"] = r["samples_per_s"] / (r["world"] * base)
    env = runs[-1]["environment"]
    path = out_dir / f"{common.run_stem('distributed', env)}.json"
    if args.smoke:
        path = Path(tempfile.mkdtemp()) / path.name
    common.write_json(path, dict(command=" ".join(["python -m bench.bench_distributed", *argv]), runs=runs,
                                 environment=env))
    for run in runs:
        for r in run["rows"]:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        if "fsdp_check" in run:
            print("fsdp check:", run["fsdp_check"])
        if "path_cost" in run:
            print("data-parallel path cost per step:", {k: (round(v, 2) if isinstance(v, float) else v)
                                                        for k, v in run["path_cost"].items()})
    print("results:", path)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    return driver(args, argv)


if __name__ == "__main__":
    common.main_exit(main)
