"""Paired mode on OPT: the default paired step against the default in-place step and the reference, the
fused linear kernel against the materialize path, and the data to set the row threshold between them.

    python -m bench.bench_paired --out bench/results/<date>-h200-paired          # one H200, < 5 min
    python -m bench.bench_paired --smoke --out /tmp/paired-smoke                  # CPU, tiny OPT, seconds

In order (a failed check stops the run before anything is timed, exit code 1):

1. ``check``: on a smaller OPT (--check-model, float16), one paired step with every nn.Linear on the
   fused kernel against one on the materialize path (``fused=True`` / ``False``), lr = 0 so that both
   see the same weights: l+, l- within a relative ``CHECK_RTOL`` and the projected gradients within
   what that allows, ``2 * CHECK_RTOL * |l| / (2 eps)``.
2. ``sweep``: on OPT-13B-shaped layers (q_proj 5120 x 5120 and fc1 20480 x 5120, float16), the fused
   kernel the fused path takes (the Hopper kernel where it accepts the operands, else the Triton one)
   against the materialize path (one pass making z once and both rounded copies, a matmul per half:
   what paired mode does without the kernel) at several row counts of the doubled batch, kernel time
   with calls queued; each point also compares the two outputs. ``suggested_max_rows``: the most rows at which the fused
   kernel is not slower on every layer (beside fastmezo.paired_linear.DEFAULT_MAX_ROWS, the automatic
   choice's threshold for the Hopper kernel).
3. ``steps``: random OPT-13B float16 (bench/models.py), at each --configs batch x tokens: the public
   API's default paired step (``fastmezo.patch(model, mode="paired")``, its ``step``), the default
   in-place step (``fastmezo.patch(model)``) and the reference (bench/baseline.py), in this run, each
   timed as the user sees it (the GPU idle before each call, CUDA events around it), with the peak
   memory above the loaded model (``max_memory_allocated`` minus what the model holds, and
   ``max_memory_reserved`` likewise: what the caching allocator held, a graph's pool included) next to a
   forward's, and which path each paired module took; also the paired step with every nn.Linear on
   the other path (``paired-fused`` up to FUSED_COMPARE_ROWS rows, or ``paired-materialized``) and, on
   CUDA, the default paired step the other way: without CUDA graphs (``paired-eager``) where the default
   captures its forward (after its warm-up steps; the row says how many steps were captured and
   replayed, and the bytes the graphs' memory pool holds), with them (``paired-graphs``) above
   fastmezo.paired_graphs.MAX_TOKENS, where the default runs eagerly.

Results: results.json and summary.md in --out.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from bench.bench_user_view import user_view_ms
from bench.common import (CheckFailed, environment, fmt_mib, free_memory, main_exit, select_device, time_ms,
                          write_json)
from bench.models import build_model, make_batch, make_closure
from bench.step_variants import EPS, LR, BaselineStepper

CHECK_RTOL = 5e-4          # float16: matmul outputs that round the other way, averaged in the loss
SWEEP_LAYERS = {"q_proj": (5120, 5120), "fc1": (20480, 5120)}
SWEEP_ROWS = (64, 128, 256, 512, 1024, 2048, 4096)
SEED = 0x5EED_1234_ABCD_0042
FUSED_COMPARE_ROWS = 512   # the fused kernel's steps are timed up to this many rows (beyond: far slower)


def user_ms(fn, device, warmup: int, reps: int) -> float:
    """Median of calls each started on an idle GPU, CUDA events around it (wall clock on the CPU)."""
    if device.type != "cuda":
        return statistics.median(time_ms(fn, device, warmup, reps))
    for _ in range(warmup - 1):          # user_view_ms makes one untimed call itself
        fn()
    return user_view_ms(fn, reps)


def _patch(model, backend, lr=LR, **options):
    import fastmezo
    extra = {} if backend is None else {"backend": backend}
    return fastmezo.patch(model, lr=lr, eps=EPS, seed=SEED, **extra, **options)


def check(name: str, device, backend, log=print) -> dict:
    """A fused paired step against a materialize-path paired step (lr = 0: same weights for both)."""
    model = build_model(name, torch.float16 if device.type == "cuda" else torch.float32, device, log=log)
    ids = make_batch(model.config.vocab_size, 2, 64 if device.type == "cuda" else 8, device)
    got = {}
    for fused in (True, False):
        with _patch(model, backend, lr=0.0, mode="paired", fused=fused) as handle:
            handle.step({"input_ids": ids, "labels": ids})
            opt = handle.optimizer
            got[fused] = (opt.loss_plus, opt.loss_minus, opt.projected_grad,
                          sorted(set(handle.paired.paths.values())))
    del model
    free_memory(device)
    (lp, lm, g, paths), (rlp, rlm, rg, ref_paths) = got[True], got[False]
    g_tol = 2 * CHECK_RTOL * max(abs(rlp), abs(rlm)) / (2 * EPS)
    result = dict(model=name, loss_plus=lp, loss_minus=lm, grad=g, ref_loss_plus=rlp, ref_loss_minus=rlm,
                  ref_grad=rg, rtol=CHECK_RTOL, grad_tol=g_tol, fused_paths=paths, ref_paths=ref_paths)
    log(f"[check {name}] fused l+ {lp:.6f} l- {lm:.6f} g {g:.4f} | materialized l+ {rlp:.6f} l- {rlm:.6f} g {rg:.4f}")
    ok = ("fused" in paths and "fused" not in ref_paths and "materialized" in ref_paths
          and all(map(math.isfinite, (lp, lm, rlp, rlm)))
          and abs(lp - rlp) <= CHECK_RTOL * abs(rlp) and abs(lm - rlm) <= CHECK_RTOL * abs(rlm)
          and abs(g - rg) <= g_tol)
    if not ok:
        raise CheckFailed(f"fused paired step disagrees with the materialize path: {result}")
    return result


def sweep(device, layers, rows_list, warmup, reps, backend, log=print) -> dict:
    """Fused kernel vs materialize path on single layers at several row counts (kernel time, queued)."""
    from fastmezo.paired_copies import ForwardCopies
    from fastmezo.paired_linear import _kernel
    from fastmezo.plan import Plan

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    points = []
    for layer, (n, k) in layers.items():
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
        plan = Plan([w], keys=[11], backend=backend)
        copies = ForwardCopies(plan, SEED, {id(w): (11, 0, EPS)})
        for rows in rows_list:
            x = torch.randn(rows, k, generator=gen, device=device).to(dtype)
            h = rows // 2

            def materialize(w=w, x=x, h=h):   # as paired mode's nn.Linear: one pair pass, a matmul per half
                (plus,), (minus,) = copies.pairs([w])
                y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
                torch.mm(x[:h], plus.t(), out=y[:h])
                torch.mm(x[h:], minus.t(), out=y[h:])
                return y

            kernel = _kernel("paired_linear_ws")[0]
            if kernel is None or not x.is_cuda or kernel.unfusable_reason(x, w, plan.noise, 0) is not None:
                kernel = _kernel()[0]
            fused = lambda w=w, x=x, k=kernel: k.paired_linear(x, w, EPS, SEED, 11, plan.noise)    # noqa: E731
            diff = (fused().float() - materialize().float()).abs().max().item()
            scale = materialize().float().abs().max().item()
            t_f = statistics.median(time_ms(fused, device, warmup, reps))
            t_m = statistics.median(time_ms(materialize, device, warmup, reps))
            points.append(dict(layer=layer, n=n, k=k, rows=rows, kernel=kernel.__name__, fused_ms=t_f,
                               materialize_ms=t_m, fused_over_materialize=t_f / t_m, max_abs_diff=diff,
                               max_abs_output=scale))
            log(f"[sweep {layer} {n}x{k}] {rows:5d} rows: fused {t_f:8.3f} ms  materialize {t_m:8.3f} ms  "
                f"ratio {t_f / t_m:5.2f}  max |diff| {diff:.3g} of {scale:.3g}")
        del w
        free_memory(device)
    wins = [r for r in sorted({p["rows"] for p in points})
            if all(p["fused_ms"] <= p["materialize_ms"] for p in points if p["rows"] <= r)]
    return dict(points=points, suggested_max_rows=max(wins, default=0))


def _graph_stats(graphs) -> dict:
    """What a handle's CUDA graphs did, and the memory their pools hold."""
    return dict(captured=graphs.captured, replayed=graphs.replayed, failed=graphs.failed,
                pool_bytes=_private_pool_bytes())


def _private_pool_bytes() -> int:
    """Bytes the CUDA graphs' private memory pools hold: reserved for the replays' intermediates, which
    ``max_memory_allocated`` counts while a graph is captured but not while it is replayed."""
    return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
               if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def profile_table(fn, device, rows: int = 25) -> str:
    """One call of ``fn`` under torch.profiler: the kernels and ops that took the most device time
    (CUDA when available), as torch's key_averages table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def steps(name: str, configs, device, warmup, reps, backend, log=print, profile_dir=None) -> list[dict]:
    """Default paired step, default in-place step and the reference on one model, per configuration;
    with ``profile_dir``, one more profiled paired and in-place step each (profile_<what>_<BxT>.txt)."""
    model = build_model(name, torch.float16 if device.type == "cuda" else torch.float32, device, log=log)
    cuda = device.type == "cuda"
    model_bytes = torch.cuda.memory_allocated(device) if cuda else None
    rows = []
    try:
        for batch, tokens in configs:
            ids = make_batch(model.config.vocab_size, batch, tokens, device)
            closure = make_closure(model, ids)
            first = len(rows)                  # this configuration's rows

            def measured(what, fn, **extra):
                before = None
                if cuda:
                    free_memory(device)
                    # what earlier rows left allocated (a leak would show here, and inflate every peak)
                    before = torch.cuda.memory_allocated(device) - model_bytes
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                ms = user_ms(fn, device, warmup, reps)
                peak = torch.cuda.max_memory_allocated(device) - model_bytes if cuda else None
                # reserved: what the caching allocator held, a CUDA graph's pool included
                reserved = torch.cuda.max_memory_reserved(device) - model_bytes if cuda else None
                row = dict(model=name, batch=batch, tokens=tokens, what=what, ms_median=ms, reps=reps,
                           peak_above_model_bytes=peak, peak_reserved_above_model_bytes=reserved,
                           allocated_before_bytes=before, **extra)
                log(f"[{name}] {batch}x{tokens} {what:9s} {row['ms_median']:9.2f} ms  memory above the model "
                    f"{fmt_mib(peak)}, reserved {fmt_mib(reserved)} (allocated before: {fmt_mib(before)})  "
                    f"{extra.get('paths', '')}")
                rows.append(row)
                return row

            with torch.no_grad():
                measured("forward", lambda: float(closure()))
            with _patch(model, backend, mode="paired") as handle:
                handle.step({"input_ids": ids, "labels": ids})      # untimed: the first step checks reads
                paths = handle.paired.paths
                counts = {p: sum(1 for v in paths.values() if v == p) for p in ("fused", "gathered", "materialized")}
                linear = sorted({paths[n] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
                paired = measured("paired", lambda: handle.step({"input_ids": ids, "labels": ids}),
                                  paths=counts, linear_paths=linear, loss=handle.optimizer.loss_plus)
                if cuda:           # captured after the warm-up steps and replayed, below MAX_TOKENS
                    paired["cuda_graphs"] = _graph_stats(handle.graphs)
                if profile_dir is not None:
                    (profile_dir / f"profile_paired_{batch}x{tokens}.txt").write_text(
                        profile_table(lambda: handle.step({"input_ids": ids, "labels": ids}), device))
            if cuda:         # the same step the other way: eager, or (above MAX_TOKENS) captured anyway
                captured = paired["cuda_graphs"]["captured"] > 0
                with _patch(model, backend, mode="paired", cuda_graphs=not captured) as handle:
                    if not captured:
                        handle.graphs.max_tokens = 1 << 62
                    handle.step({"input_ids": ids, "labels": ids})
                    row = measured("paired-eager" if captured else "paired-graphs",
                                   lambda: handle.step({"input_ids": ids, "labels": ids}),
                                   loss=handle.optimizer.loss_plus)
                    if not captured:
                        row["cuda_graphs"] = _graph_stats(handle.graphs)
            # The other path for every nn.Linear, where the fused kernel is in its range.
            other = "materialized" if paired["linear_paths"] != ["materialized"] else "fused"
            if other == "materialized" or batch * tokens * 2 <= FUSED_COMPARE_ROWS:
                with _patch(model, backend, mode="paired", fused=other == "fused") as handle:
                    handle.step({"input_ids": ids, "labels": ids})
                    row = measured(f"paired-{other}", lambda: handle.step({"input_ids": ids, "labels": ids}),
                                   loss=handle.optimizer.loss_plus)
                    if handle.graphs is not None and handle.graphs.captured:
                        row["cuda_graphs"] = _graph_stats(handle.graphs)
                    if profile_dir is not None:
                        (profile_dir / f"profile_paired-{other}_{batch}x{tokens}.txt").write_text(
                            profile_table(lambda: handle.step({"input_ids": ids, "labels": ids}), device))
            with _patch(model, None) as handle:          # in place: the automatic backend
                inplace = measured("inplace", lambda: handle.step(closure), loss=None)
                inplace["loss"] = handle.optimizer.loss_plus
                if profile_dir is not None:
                    (profile_dir / f"profile_inplace_{batch}x{tokens}.txt").write_text(
                        profile_table(lambda: handle.step(closure), device))
            ref = BaselineStepper(model)
            reference = measured("reference", lambda: ref.step(closure), loss=None)
            reference["loss"] = ref.last_loss
            for r in rows[first:]:
                if r["what"] not in ("forward", "reference"):
                    r["speedup_vs_reference"] = reference["ms_median"] / r["ms_median"]
            for r in (paired, inplace, reference):
                if r["loss"] is None or not math.isfinite(r["loss"]):
                    raise RuntimeError(f"{name} {batch}x{tokens} {r['what']}: loss {r['loss']}")
    finally:
        del model
        free_memory(device)
    return rows


def summary_md(result: dict) -> str:
    env, lines = result["environment"], [f"# Paired mode ({result['environment']['gpu']})", ""]
    lines += [f"commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", ""]
    c = result["check"]
    lines += [f"Check ({c['model']}): fused l+ {c['loss_plus']:.6f} / l- {c['loss_minus']:.6f} / g {c['grad']:.4f}; "
              f"materialized {c['ref_loss_plus']:.6f} / {c['ref_loss_minus']:.6f} / {c['ref_grad']:.4f}", ""]
    lines += ["| config | step | ms | vs reference | memory above model | reserved above model | paths |",
              "|---|---|---:|---:|---:|---:|---|"]
    for r in result["steps"]:
        speed = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        lines.append(f"| {r['batch']}x{r['tokens']} | {r['what']} | {r['ms_median']:.2f} | {speed} | "
                     f"{fmt_mib(r['peak_above_model_bytes'])} | {fmt_mib(r.get('peak_reserved_above_model_bytes'))} | "
                     f"{r.get('paths', '')}"
                     f"{_graphs_md(r.get('cuda_graphs'))} |")
    if "sweep" in result:
        lines += ["", "| layer | rows | fused ms | materialize ms | ratio |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['layer']} | {p['rows']} | {p['fused_ms']:.3f} | {p['materialize_ms']:.3f} | "
                  f"{p['fused_over_materialize']:.2f} |" for p in result["sweep"]["points"]]
        lines += ["", f"Suggested row threshold: {result['sweep']['suggested_max_rows']} "
                  f"(fastmezo.paired_linear.DEFAULT_MAX_ROWS = {result['default_max_rows']})"]
    lines.append("")
    return "\n".join(lines)


def _graphs_md(stats) -> str:
    if not stats:
        return ""
    return (f" CUDA graphs: {stats['captured']} captured, {stats['replayed']} replays, {stats['failed']} failed, "
            f"pool {fmt_mib(stats['pool_bytes'])}")


def parse_configs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and summary.md")
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--check-model", default="opt-1.3b")
    parser.add_argument("--configs", default="1x128,16x256", help="batch x tokens, comma-separated")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter), tiny OPT, seconds")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one paired and one in-place step per configuration (torch.profiler)")
    parser.add_argument("--skip-sweep", action="store_true", help="only the check and the steps")
    args = parser.parse_args(argv)
    device = select_device(args.smoke, "bench.bench_paired")
    from fastmezo.paired_linear import DEFAULT_MAX_ROWS

    t0 = time.perf_counter()
    # Paired mode on the CPU: the Triton interpreter, so that the fused kernel runs (automatic on CUDA).
    backend = "triton" if device.type == "cpu" else None
    if args.smoke:
        args.model = args.check_model = "opt-tiny"
        configs, layers, rows_list, warmup, reps = [(1, 8)], {"tiny": (64, 32)}, (8, 16), 0, 1
    else:
        configs, layers, rows_list, warmup, reps = (parse_configs(args.configs), SWEEP_LAYERS, SWEEP_ROWS,
                                                    args.warmup, args.reps)
    result = dict(environment=environment(device), default_max_rows=DEFAULT_MAX_ROWS, eps=EPS, lr=LR)
    result["check"] = check(args.check_model, device, backend)
    if not args.skip_sweep:
        result["sweep"] = sweep(device, layers, rows_list, warmup, max(reps, 3 if not args.smoke else 1), backend)
    args.out.mkdir(parents=True, exist_ok=True)
    result["steps"] = steps(args.model, configs, device, warmup, reps, backend,
                            profile_dir=args.out if args.profile else None)
    result["seconds"] = time.perf_counter() - t0
    write_json(args.out / "results.json", result)
    (args.out / "summary.md").write_text(summary_md(result))
    print(summary_md(result))
    return 0


if __name__ == "__main__":
    main_exit(main)
