"""Weight drift of MeZO's perturb/restore in float16 and bfloat16: null steps, four ways.

A null step is +eps z, -2 eps z, +eps z with lr 0: in exact arithmetic the weights come back. In a
low-precision dtype every in-place pass rounds the stored value, and the rounding errors of the restore
add up (docs/noise.md describes the rounding of each pass). Measured here, on weights ~ N(0, 0.02) with eps 1e-3, as the relative
drift ||w_T - w_0|| / ||w_0|| after T null steps, for:

  reference   the baseline, the paper's way (bench/baseline.py): torch.manual_seed + torch.normal in the
              weight's dtype + out-of-place add, round to nearest
  inplace-rn  fastmezo.MeZO, in-place, round to nearest (stochastic_rounding=False)
  inplace-update fastmezo.MeZO, in-place, stochastic rounding of the update pass only (the default;
              with lr 0 its perturbation passes round to nearest)
  inplace-sr  fastmezo.MeZO, in-place, stochastic rounding of every pass
  exact       fastmezo.patch(holder, mode="exact"): W + eps z materialized for the forward, the stored
              weight written only by the (here: null) update; must stay bit-identical: asserted at
              every checkpoint
  paired      fastmezo.patch(linear, mode="paired"): the weight as an nn.Linear of 64 in-features, both
              perturbed forwards as one over a doubled batch; bit-identical, asserted likewise

fastmezo's null steps are real MeZO steps (MeZO.step with lr 0 and a constant loss, so g = 0).

    python -m bench.bench_drift --quick --out DIR      # CPU: small tensors
    python -m bench.bench_drift --out DIR              # CUDA if present: up to 1M elements

Writes drift-<stamp>-<device>.csv and .json (every checkpoint, with versions and times) and
drift-<stamp>-<device>.png (drift against T, log-log, one panel per dtype) to --out, and prints a table.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

import fastmezo
from bench.baseline import baseline_perturb
from bench.common import DTYPES, environment, fastmezo_backend

METHODS = ("reference", "inplace-rn", "inplace-update", "inplace-sr", "exact", "paired")
BIT_IDENTICAL = ("exact", "paired")      # the stored weights are written only by the update
ROUNDING = {"inplace-rn": False, "inplace-update": "update", "inplace-sr": True}


class Holder(torch.nn.Module):
    """One weight, read by the forward (so exact mode materializes W + eps z for it)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=True)

    def forward(self):
        # A constant loss that still reads the (perturbed) weight: g = 0, a null step.
        return self.weight[:1].float().sum() * 0.0


def initial_weight(numel, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(numel, generator=g) * 0.02).to(dtype).to(device)


def relative_drift(w, w0) -> float:
    return float((w.double() - w0.double()).norm() / w0.double().norm())


def run_method(method, w0, steps, checkpoints, eps, seed, sync):
    """Drift at each checkpoint of ``method`` over ``steps`` null steps; returns [(T, drift, seconds)]."""
    w = w0.clone()
    rows, t0 = [], time.perf_counter()
    if method == "reference":
        def null_step(t):
            for scale in (1, -2, 1):            # w.data is replaced, out of place, as the paper does
                baseline_perturb([w], seed + t, scale, eps)
    elif method in ROUNDING:
        opt = fastmezo.MeZO([w], lr=0.0, eps=eps, seed=seed, stochastic_rounding=ROUNDING[method])

        def null_step(t):
            opt.step(lambda: 0.0)
    elif method == "exact":
        holder = Holder(w)
        handle = fastmezo.patch(holder, lr=0.0, eps=eps, seed=seed, mode="exact", loss_fn=lambda m, b: m())
        w = holder.weight.data

        def null_step(t):
            handle.step(None)
    elif method == "paired":
        holder = torch.nn.Linear(64, w.numel() // 64, bias=False, device=w.device, dtype=w.dtype)
        holder.weight = torch.nn.Parameter(w.view(-1, 64))
        handle = fastmezo.patch(holder, lr=0.0, eps=eps, seed=seed, mode="paired",
                                loss_fn=lambda m, b: m(b).float().sum(1) * 0.0)   # one loss a row: g = 0
        x = torch.ones(1, 64, dtype=w.dtype, device=w.device)
        w = holder.weight.data.view(-1)

        def null_step(t):
            handle.step(x)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    try:
        for t in range(1, steps + 1):
            null_step(t)
            if t in checkpoints:
                sync()
                drift = relative_drift(w, w0)
                if method in BIT_IDENTICAL and not torch.equal(w, w0):
                    raise AssertionError(f"{method} mode changed the weights after {t} null steps "
                                         f"(relative drift {drift:.3g}): it must leave them bit-identical")
                rows.append((t, drift, time.perf_counter() - t0))
    finally:
        if method in BIT_IDENTICAL:
            handle.remove()
    return rows


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dtypes = sorted({r["dtype"] for r in rows}, key=list(DTYPES).index)
    sizes = sorted({r["numel"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, dtype in zip(axes[0], dtypes):
        drifting = False           # a log axis needs some positive drift to show
        for mi, method in enumerate(METHODS):
            for si, numel in enumerate(sizes):
                pts = [(r["steps"], r["rel_drift"]) for r in rows
                       if r["dtype"] == dtype and r["method"] == method and r["numel"] == numel]
                if not pts:
                    continue
                label = f"{method}, {numel:,} elements"
                if method in BIT_IDENTICAL:
                    # Zero drift does not show on a log axis: note it in the legend instead.
                    assert all(d == 0 for _, d in pts)
                    ax.plot([], [], "x", color=f"C{mi}", label=f"{method}: 0 (bit-identical), {numel:,}")
                    continue
                ax.plot(*zip(*pts), styles[si % 4], marker="o", ms=3, color=f"C{mi}", label=label)
                drifting = True
        ax.set(xscale="log", yscale="log" if drifting else "linear", xlabel="null steps T",
               ylabel="||w_T - w_0|| / ||w_0||", title=f"{dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--sizes", default=None, help="comma-separated numels (default 4096,65536,1048576; "
                   "--quick 4096,16384)")
    p.add_argument("--checkpoints", default="1,10,100,500,1000,2000")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="small tensors (on a CPU the out-of-place and rounding passes run the torch oracle)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = [int(s) for s in (args.sizes or ("4096,16384" if args.quick else "4096,65536,1048576")).split(",")]
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    methods = [m for m in args.methods.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    if not checkpoints or checkpoints[0] < 1:
        p.error("checkpoints must be positive step counts")
    steps = checkpoints[-1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    device_name = env["gpu"]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    tag = f"drift-{stamp}-{'cuda' if device.type == 'cuda' else 'cpu'}"
    rows = []
    t_start = time.perf_counter()
    for dtype_name in dtypes:
        for numel in sizes:
            w0 = initial_weight(numel, DTYPES[dtype_name], device, args.seed)
            for method in methods:
                for t, drift, seconds in run_method(method, w0, steps, set(checkpoints), args.eps, args.seed, sync):
                    rows.append(dict(device=str(device), dtype=dtype_name, numel=numel, method=method, steps=t,
                                     rel_drift=drift, seconds=round(seconds, 3)))
                print(f"{dtype_name:9s} {numel:>9,d} {method:11s} drift after {steps}: {rows[-1]['rel_drift']:.3e} "
                      f"({rows[-1]['seconds']:.1f} s)", flush=True)
    wall = time.perf_counter() - t_start

    meta = dict(benchmark="bench/bench_drift.py", command=" ".join([os.path.basename(sys.executable)] + sys.argv),
                environment=env, device_name=device_name, threads=torch.get_num_threads(), eps=args.eps, weight_std=0.02, seed=args.seed, checkpoints=checkpoints, wall_seconds=round(wall, 1),
                backend=fastmezo_backend(device), stamp=stamp)
    (out / f"{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(out / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / f"{tag}.png", f"MeZO null steps (eps {args.eps:g}, w ~ N(0, 0.02)), {device_name}")

    # Table: relative drift in percent, one row per (dtype, size, method), one column per checkpoint.
    print(f"\nrelative drift ||w_T - w_0|| / ||w_0|| in %  ({device_name}, eps {args.eps:g})")
    head = f"{'dtype':9s} {'numel':>9s} {'method':11s} " + " ".join(f"{'T=' + str(c):>9s}" for c in checkpoints)
    print(head)
    for dtype_name in dtypes:
        for numel in sizes:
            for method in methods:
                by_t = {r["steps"]: r["rel_drift"] for r in rows
                        if (r["dtype"], r["numel"], r["method"]) == (dtype_name, numel, method)}
                print(f"{dtype_name:9s} {numel:>9,d} {method:11s} " +
                      " ".join(f"{100 * by_t[c]:9.4f}" for c in checkpoints))
    print(f"wall time {wall:.0f} s; exact mode bit-identical at every checkpoint; outputs {out}/{tag}.*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
