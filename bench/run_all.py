"""All of fastmezo's benchmarks in one command, for your own GPU:

    python -m bench.run_all --out bench/results/my-gpu

1. the pass benchmark (bench/bench_perturb.py): one perturbation / restore-and-update pass over OPT-shaped
   parameters, fastmezo against the reference way, as multiples of the one-pass memory floor;
2. the step benchmark (bench/bench_steps.py): whole MeZO steps with the two forward passes of a randomly
   initialised OPT (no download), the baseline step and fastmezo.MeZO in four variants (in place or
   exact mode, rounding to nearest or stochastic: inplace-rn, inplace-sr, exact-rn, exact-sr; --variants
   picks), all on the same model instance, per batch configuration: step time, ZO overhead (step - two
   forwards), speed-ups, overhead over the floor, peak memory above inference, exact / in-place overhead;
3. with --opt66b, the largest batch OPT-66B (fp16, one GPU) can take a step with, for each.

Both check fastmezo's kernels against the torch oracle before timing anything (exit code 1 if they
disagree); whole steps are checked by the GPU tests (``pytest -m gpu tests``). --out receives each benchmark's own JSON and CSV (GPU name, torch / triton / CUDA versions,
git commit on every row), plus:

    results.json   everything: environment, settings, both benchmarks' results, the file list
    summary.png    bars: pass time / floor per model and dtype; step time of the reference and of each
                   variant per batch configuration
    summary.md     the same as markdown tables, ready to paste into a README (the step table: model,
                   batch, reference, inplace-rn, inplace-sr, exact-rn, exact-sr step ms, the exact /
                   in-place overhead ratios and exact mode's extra MiB)

Options: --models (default opt-1.3b,opt-13b), --dtypes (default float16,bfloat16), --quick (opt-1.3b,
float16, two batch configurations, fewer repetitions: about a minute), --skip-steps, --opt66b, and the
step benchmark's own options (--configs, --step-reps, --variants, --rounding, ...; see --help). --smoke runs
everything on tiny shapes, on the CPU when there is no GPU (the times then mean nothing), into a
temporary directory unless --out is given: the test suite runs it to prove the script works end to end.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench import bench_perturb, bench_steps, opt66b
from bench.common import RESULTS, backend_runs, cpu_threads, environment, main_exit, parse_dtypes, parse_models, select_device
from bench.step_variants import VARIANTS, inplace_twin

DEFAULT_MODELS = "opt-1.3b,opt-13b"
DEFAULT_DTYPES = "float16,bfloat16"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="output directory (default bench/results/run-<UTC time>; a temporary directory "
                             "with --smoke)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated OPT sizes: opt-125m, opt-1.3b, opt-13b, opt-66b (default "
                             f"{DEFAULT_MODELS}; --quick opt-1.3b; --smoke opt-tiny)")
    parser.add_argument("--dtypes", default=None,
                        help=f"comma-separated: float16, bfloat16, float32 (default {DEFAULT_DTYPES}; --quick "
                             "float16; --smoke float32 on the CPU, float16 on a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset: opt-1.3b, float16, batches 4x256 and 1x128, fewer repetitions")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, anywhere (CPU without a GPU): checks that everything runs")
    parser.add_argument("--skip-steps", action="store_true", help="only the pass benchmark (and --opt66b if given)")
    parser.add_argument("--skip-passes", action="store_true", help="only the step benchmark")
    parser.add_argument("--pass-reps", type=int, default=None,
                        help="timed calls per pass measurement (default 10; 5 with --quick; 1 with --smoke)")
    bench_steps.add_step_arguments(parser)
    args = parser.parse_args(argv)
    default_models = "opt-tiny" if args.smoke else "opt-1.3b" if args.quick else DEFAULT_MODELS
    args.models = parse_models(args.models or default_models, parser)
    if args.dtypes is None:
        args.dtypes = ("float32" if not torch.cuda.is_available() else "float16") if args.smoke else \
            "float16" if args.quick else DEFAULT_DTYPES
    args.dtypes = parse_dtypes(args.dtypes, parser)
    if args.pass_reps is None:
        args.pass_reps = 1 if args.smoke else 5 if args.quick else 10
    if args.pass_reps < 1:
        parser.error("--pass-reps must be >= 1")
    return bench_steps.finish_args(args, parser)


def pass_backend(args, device: torch.device) -> str:
    """The backend the pass benchmark times: --backend when it names a kernel backend, else triton; on
    the CPU (smoke runs) the native C++ kernels where built (Triton's interpreter is slow), else triton."""
    if args.backend in ("triton", "native"):
        return args.backend
    if device.type == "cpu":
        return "native" if backend_runs("native", device) else "triton"
    return "triton"


# ---------------------------------------------------------------------------------------------------
# Plot and summary


def _pass_table(passes: dict | None):
    """{(model, dtype): {(impl, op): row}} of the measured Gaussian passes and derived steps."""
    table: dict = {}
    for r in (passes or {}).get("rows", []):
        if r["noise"] == "gaussian":
            table.setdefault((r["model"], r["dtype"]), {})[r["impl"], r["op"]] = r
    return table


def _variant(row: dict) -> str:
    """A step row's variant: forward, reference, inplace-rn, inplace-sr, exact-rn or exact-sr (rows of
    a bench_steps.py from before the variants: fastmezo in place, by its rounding)."""
    if row.get("variant"):
        return row["variant"]
    if row["impl"] == "fastmezo":
        return "inplace-sr" if row.get("rounding") == "stochastic" else "inplace-rn"
    return row["impl"]


def _step_table(steps: dict | None):
    """{(model, dtype, "BxT"): {variant: row}}, in run order (variant: forward, reference, inplace-rn, ...)."""
    table: dict = {}
    for r in (steps or {}).get("rows", []):
        table.setdefault((r["model"], r["dtype"], f"{r['batch']}x{r['tokens']}"), {})[_variant(r)] = r
    return table


def _variants_present(st: dict) -> list[str]:
    """The fastmezo variants that have rows, in bench_steps.VARIANTS order."""
    seen = {v for t in st.values() for v in t}
    return [v for v in VARIANTS if v in seen]


#: Plot colours of the step panel.
STEP_COLORS = {"forward": "tab:gray", "reference": "tab:red", "inplace-rn": "tab:cyan",
               "inplace-update": "tab:purple", "inplace-sr": "tab:blue",
               "exact-rn": "tab:olive", "exact-sr": "tab:green"}


def plot(passes: dict | None, steps: dict | None, path: Path, title: str) -> Path:
    """summary.png: (top) time of one pass / floor, fastmezo vs reference, per model and dtype;
    (middle) whole-step time of fastmezo and the reference, and of the two forwards alone, per batch
    configuration; (bottom, with --opt66b) OPT-66B step time per batch until out of memory."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    big = (steps or {}).get("opt66b")
    panels = 3 if big and big.get("rows") else 2
    fig, axes = plt.subplots(panels, 1, figsize=(12, 4.2 * panels))
    fig.suptitle(title, fontsize=10)

    ax = axes[0]
    pt = _pass_table(passes)
    series = [("fastmezo", "perturb", "fastmezo perturb", "tab:blue"),
              ("fastmezo", "restore_and_update", "fastmezo restore+update", "tab:cyan"),
              ("reference", "perturb", "reference perturb", "tab:red"),
              ("reference", "update", "reference update", "tab:orange")]
    if pt:
        groups = list(pt)
        width = 0.8 / len(series)
        for k, (impl, op, label, color) in enumerate(series):
            ys = [pt[g].get((impl, op), {}).get("ratio_to_floor") or 0.0 for g in groups]
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))], ys, width,
                   label=label, color=color)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="floor (read + write once)")
        ax.set_xticks(range(len(groups)), [f"{m}\n{d}" for m, d in groups])
        ax.set_ylabel("time of one pass / floor")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "pass benchmark not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("one pass over the parameters (Gaussian noise), as a multiple of the memory floor", fontsize=10)

    ax = axes[1]
    st = _step_table(steps)
    series = [("forward", "two forwards (no ZO)", STEP_COLORS["forward"]),
              ("reference", "reference step", STEP_COLORS["reference"])]
    series += [(v, f"fastmezo {v} step", STEP_COLORS[v]) for v in _variants_present(st)]
    if st:
        groups = list(st)
        width = 0.8 / len(series)
        for k, (impl, label, color) in enumerate(series):
            ys = [st[g].get(impl, {}).get("ms_median") or 0.0 for g in groups]
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))], ys, width,
                   label=label, color=color)
        ax.set_xticks(range(len(groups)), [f"{m}\n{d}\n{c}" for m, d, c in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (log)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "step benchmark not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("whole MeZO step (two forwards + ZO passes), per batch x tokens; fastmezo in place / exact "
                 "mode, rounding to nearest (rn) / stochastic (sr)", fontsize=10)

    if panels == 3:
        ax = axes[2]
        s = big["summary"]
        impls = [i for i in ("fastmezo", "reference") if any(r["impl"] == i for r in big["rows"])]
        batches = sorted({r["batch"] for r in big["rows"]})
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            by_batch = {r["batch"]: r for r in big["rows"] if r["impl"] == impl}
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(batches))]
            ys = [by_batch[b]["ms"] if b in by_batch and by_batch[b].get("status") == "ok" else 0.0 for b in batches]
            ax.bar(xs, ys, width, label=impl, color="tab:blue" if impl == "fastmezo" else "tab:red")
            for x, b in zip(xs, batches):
                if b in by_batch and by_batch[b].get("status") != "ok":
                    ax.text(x, 0, "OOM", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(range(len(batches)), [f"{b}x{s['tokens']}" for b in batches])
        ax.set_ylabel("ms per step")
        ax.legend(fontsize=8)
        ax.set_title(f"{s['model']} {s['dtype']}: one step per batch until out of memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _f(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec) + suffix


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _ratio_cell(t: dict, variants: list[str]) -> str:
    """'rn / sr' of exact overhead / in-place overhead, for the roundings with both variants measured."""
    cells = [_f(t.get(v, {}).get("overhead_vs_inplace"), ".2f", "x") for v in variants
             if v.startswith("exact-") and inplace_twin(v) in variants]
    return " / ".join(cells) if cells else "n/a"


def _step_markdown(st: dict, variants: list[str], backend: str) -> list[str]:
    """The two step tables: step time per variant (compact), then overhead, x floor, speed-ups and memory."""
    exact = [v for v in variants if v.startswith("exact-")]
    paired = [v for v in exact if inplace_twin(v) in variants]
    impls = ["reference", *variants]
    lines = ["", f"**Whole MeZO steps** on a randomly initialised OPT (two forwards + ZO passes; median ms; "
             f"fastmezo backend {backend}). fastmezo variants: in place (`inplace`) or exact mode (`exact`: W + eps z "
             "materialized per group of modules, stored weights written only by the update), float16/bfloat16 stores rounded "
             "to nearest (`rn`) or stochastically (`sr`); all on the same model instance. exact / in place = ZO "
             "overhead (step - two forwards) of exact mode over that of in place with the same rounding "
             "(target <= 1.3x); extra MiB = peak memory above a plain forward of the same batch "
             "(exact mode: about one weight tensor).", "",
             "| model | dtype | batch x tokens | 2 forwards | reference | "
             + " | ".join(variants) + " |"
             + ("" if not paired else f" exact / in place overhead {' / '.join(v.split('-')[1] for v in paired)} |")
             + ("" if not exact else f" extra MiB {' / '.join(exact)} |"),
             "|---|---|---|" + "---:|" * (2 + len(variants) + bool(paired) + bool(exact))]
    for (model, dtype, config), t in st.items():
        row = (f"| {model} | {dtype} | {config} | {_f(t.get('forward', {}).get('ms_median'))} | "
               + " | ".join(_f(t.get(v, {}).get("ms_median")) for v in impls) + " |")
        if paired:
            row += f" {_ratio_cell(t, variants)} |"
        if exact:
            row += " " + " / ".join(_mib(t.get(v, {}).get("peak_extra_vs_inference_bytes")) for v in exact) + " |"
        lines.append(row)

    lines += ["", f"ZO overhead per step (ms), overhead / one-pass floor (ideal 3 for fastmezo, 4 for the reference) "
              f"and extra MiB, each as {' / '.join(impls)}; speed-ups over the reference (step and overhead) as "
              f"{' / '.join(variants)}:", "",
              "| model | dtype | batch x tokens | overhead ms | overhead x floor | step speed-up | overhead speed-up "
              "| extra MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for (model, dtype, config), t in st.items():
        def cells(key, spec=".2f", suffix="", names=impls, t=t):
            return " / ".join(_f(t.get(v, {}).get(key), spec, suffix) for v in names)
        lines.append(f"| {model} | {dtype} | {config} | {cells('overhead_ms')} | {cells('overhead_x_floor', '.1f')} | "
                     f"{cells('speedup_step_vs_reference', '.2f', 'x', variants)} | "
                     f"{cells('speedup_overhead_vs_reference', '.2f', 'x', variants)} | "
                     + " / ".join(_mib(t.get(v, {}).get("peak_extra_vs_inference_bytes")) for v in impls) + " |")
    return lines


def summary_markdown(env: dict, passes: dict | None, steps: dict | None, bandwidth: dict | None) -> str:
    """Markdown tables of both benchmarks (and the OPT-66B search), with the environment line."""
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    lines = [f"### fastmezo benchmarks on {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, transformers "
             f"{env.get('transformers', '?')}; commit `{env['commit'][:12]}`{dirty}; {env['date']}."]
    if bandwidth:
        lines[-1] += (f" Copy bandwidth {bandwidth['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; floor = reading "
                      "and writing every parameter once at that bandwidth.")
    if env["device"] == "cpu":
        lines += ["", "*Smoke run on a CPU: tiny shapes, the times mean nothing.*"]

    pt = _pass_table(passes)
    if pt:
        lines += ["", "**One pass over the parameters** (Gaussian noise; ms, and in brackets the multiple of the "
                  "floor). ZO overhead per step: fastmezo 2 perturb + 1 restore-and-update, the reference 3 "
                  "perturb + 1 update.", "",
                  "| model | dtype | floor ms | fastmezo perturb | fastmezo restore+update | reference perturb "
                  "| reference update | ZO overhead/step fastmezo | reference | speed-up |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (model, dtype), t in pt.items():
            def cell(key, t=t):
                r = t.get(key)
                return "n/a" if r is None else f"{r['ms_median']:.2f} ({r['ratio_to_floor']:.1f}x)"
            floor = next(iter(t.values()))["floor_ms"]
            fast_step = t.get(("fastmezo", "step"))
            lines.append(f"| {model} | {dtype} | {floor:.2f} | {cell(('fastmezo', 'perturb'))} | "
                         f"{cell(('fastmezo', 'restore_and_update'))} | {cell(('reference', 'perturb'))} | "
                         f"{cell(('reference', 'update'))} | {cell(('fastmezo', 'step'))} | "
                         f"{cell(('reference', 'step'))} | "
                         f"{_f(fast_step and fast_step['speedup_vs_reference'], '.2f', 'x')} |")
        skipped = [s for s in passes.get("models", []) if "skipped" in s]
        lines += [f"\n{s['model']} {s['dtype']} skipped: {s['skipped']}" for s in skipped]

    st = _step_table(steps)
    variants = _variants_present(st)
    if st:
        lines += _step_markdown(st, variants, steps["settings"]["backend"])
    for s in (steps or {}).get("models", []):
        if "skipped" in s:
            lines.append(f"\n{s['model']} {s['dtype']} skipped: {s['skipped']}")

    big = (steps or {}).get("opt66b")
    if big:
        s = big["summary"]
        lines += ["", f"**{s['model']} {s['dtype']} on one GPU**, {s['tokens']} tokens per sequence: the largest "
                  f"batch a step fits with (tried {', '.join(map(str, s['batches']))})."]
        if "skipped" in s:
            lines.append(f"\nSkipped: {s['skipped']}")
        else:
            lines += ["", "| impl | largest batch | step ms there | peak GiB there | above inference MiB |",
                      "|---|---:|---:|---:|---:|"]
            for impl, batch in big["largest"].items():
                r = next((r for r in big["rows"] if r["impl"] == impl and r["batch"] == batch
                          and r.get("status") == "ok"), {})
                peak = r.get("peak_bytes")
                lines.append(f"| {impl} | {batch if batch is not None else 'none'} | {_f(r.get('ms'), '.1f')} | "
                             f"{_f(None if peak is None else peak / 2**30, '.2f')} | "
                             f"{_mib(r.get('peak_extra_vs_inference_bytes'))} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Main


def main(argv=None) -> dict:
    """Run the benchmarks; returns {"environment", "settings", "passes", "steps", "files"} (also
    written to --out/results.json)."""
    args = parse_args(argv)
    opt66b.prepare_allocator(args.opt66b)
    device = select_device(args.smoke, "bench.run_all")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="fastmezo-run-all-smoke-")) if args.smoke else RESULTS / f"run-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    log = lambda *a: print(*a, flush=True)  # noqa: E731  (progress shows while a long run goes on)
    log(f"fastmezo benchmarks -> {out_dir}")
    settings = {k: v for k, v in vars(args).items() if k != "configs"}
    settings["configs"] = [f"{b}x{t}" for b, t in args.configs]
    result = {"benchmark": "run_all", "environment": env, "settings": settings, "passes": None, "steps": None,
              "files": {}}
    error = None
    with cpu_threads(device, args.smoke):
        try:
            if not args.skip_passes:
                backend = pass_backend(args, device)
                argv_p = ["--models", ",".join(args.models), "--dtypes", ",".join(args.dtypes), "--out", str(out_dir),
                          "--reps", str(args.pass_reps), "--backend", backend] + (["--smoke"] if args.smoke else [])
                log(f"\n== pass benchmark: python -m bench.bench_perturb {' '.join(argv_p)}")
                result["passes"] = bench_perturb.main(argv_p)
            if not args.skip_steps or args.opt66b:
                step_args = argparse.Namespace(**vars(args))
                if args.skip_steps:
                    step_args.models = []
                log("\n== step benchmark" + (" (OPT-66B search only)" if args.skip_steps else ""))
                bandwidth = result["passes"]["bandwidth"] if result["passes"] else None
                result["steps"] = bench_steps.run(step_args, device, env, out_dir, bandwidth=bandwidth, log=log)
        except BaseException as exc:  # noqa: BLE001  (a failed check, an error, Ctrl-C: write what was
            error = exc                #                  measured so far, then fail with the same exception)
            result["error"] = f"{type(exc).__name__}: {exc}"
    bandwidth = (result["passes"] or result["steps"] or {}).get("bandwidth")
    title = (f"fastmezo on {env['gpu']} | torch {env['torch']} triton {env['triton']} CUDA {env['cuda']} | "
             f"commit {env['commit'][:10]}")
    png = out_dir / "summary.png"
    try:
        plot(result["passes"], result["steps"], png, title)
    except Exception as exc:  # noqa: BLE001  (the numbers matter more than the picture: keep going)
        result["plot_error"] = f"{type(exc).__name__}: {exc}"
        log(f"warning: no plot: {result['plot_error']}")
    md = out_dir / "summary.md"
    text = summary_markdown(env, result["passes"], result["steps"], bandwidth)
    if error is not None:
        text += f"\n**The run stopped early** ({result['error'].splitlines()[0]}): the tables hold what was measured before.\n"
    md.write_text(text)
    result["files"] = {"summary_png": str(png), "summary_md": str(md), "results_json": str(out_dir / "results.json"),
                       "csv": sorted(str(p) for p in out_dir.glob("*.csv")),
                       "json": sorted(str(p) for p in out_dir.glob("*.json") if p.name != "results.json")}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"\nwrote {out_dir / 'results.json'}\nwrote {png}\nwrote {md}\n")
    log(md.read_text())
    if error is not None:
        raise error
    return result


if __name__ == "__main__":
    main_exit(main)
