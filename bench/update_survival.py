"""Do MeZO updates far below one ulp survive in bfloat16 / float16? Each stochastic-rounding mode says.

A MeZO step moves theta by -lr * g * z. With lr 1e-6 on weights of about 0.02 that is a few
thousandths of a bfloat16 ulp: rounding to nearest drops it, stochastic rounding keeps it on average.
Measured here with real ``fastmezo.MeZO`` steps on one weight tensor ~ N(0, 0.02): the closure
returns +c at theta + eps z and -c at theta - eps z, so every step has the same projected gradient
g = c / eps and the update the weights should have received after T steps is known exactly,
u = -lr * g * sum_t z_t (z from ``fastmezo.make_noise``, summed in float64). With the weights' actual
change d = w_T - w_0, reported per mode:

  slope     <d, u> / <u, u>: 1 when the updates survive on average, 0 when they are dropped
  noise     ||d - slope * u|| / ||u||: what the roundings of the passes add on top

for the modes of ``MeZO(stochastic_rounding=...)``: False (round to nearest everywhere, the
reference's way), "update" (stochastic rounding of the update pass only, the default) and True
(stochastic rounding of every pass), in place and in exact mode (``fastmezo.patch(mode=...)``; exact
mode's only pass is the update, so True is "update" there).

    python -m bench.update_survival --out DIR [--numel 1048576] [--steps 200] [--lr 1e-6]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import fastmezo
from fastmezo.functional import make_noise
from bench.common import environment

MODES = {"nearest": False, "update": "update", "stochastic": True}


class _Holder(torch.nn.Module):
    """One weight read by the forward, so that exact mode materializes W + eps z for it."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self):
        return self.weight[:1].float().sum() * 0.0


def survival(dtype, perturbation, mode, numel: int, steps: int, lr: float, eps: float, g: float,
             seed: int = 3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(numel, generator=gen) * 0.02).to(dtype)
    holder = _Holder(w0.clone())
    handle = fastmezo.patch(holder, lr=lr, eps=eps, seed=seed, mode=perturbation, stochastic_rounding=mode)
    key = fastmezo.key_from_name("weight")       # patch keys the noise by the parameter's name
    calls = iter(range(2 * steps))
    expected = torch.zeros(numel, dtype=torch.float64)
    for _ in range(steps):
        # l+ = +g eps, l- = -g eps: the projected gradient is g at every step.
        handle.step(lambda: holder() + (g * eps if next(calls) % 2 == 0 else -g * eps))
        opt = handle.optimizer
        expected -= lr * opt.projected_grad * make_noise(numel, opt.last_seed, key).double()
    handle.remove()
    w = holder.weight.detach()
    d = w.double() - w0.double()
    slope = float(d @ expected / (expected @ expected))
    noise = float((d - slope * expected).norm() / expected.norm())
    ulp = float(torch.finfo(dtype).eps) * 0.02
    return dict(dtype=str(dtype).split(".")[-1], perturbation=perturbation,
                mode=[k for k, v in MODES.items() if v == mode][0],
                numel=numel, steps=steps, lr=lr, eps=eps, projected_grad=g,
                update_in_ulps=lr * g / ulp, slope=slope, noise=noise)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--numel", type=int, default=1 << 20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--grad", type=float, default=10.0, help="the projected gradient of every step")
    args = p.parse_args(argv)
    rows = [survival(dtype, perturbation, mode, args.numel, args.steps, args.lr, args.eps, args.grad)
            for dtype in (torch.bfloat16, torch.float16) for perturbation in ("inplace", "exact")
            for mode in MODES.values() if not (perturbation == "exact" and mode is True)]
    lines = ["| dtype | mode | stochastic_rounding | update per step (ulp of 0.02) | slope | noise |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['perturbation']} | {r['mode']} | {r['update_in_ulps']:.3g} | "
                     f"{r['slope']:.3f} | {r['noise']:.2f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(environment=environment(torch.device("cpu")), args=vars(args), rows=rows)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "summary.md").write_text(f"# Sub-ulp MeZO updates: do they survive? ({args.steps} steps, "
                                    f"{args.numel:,} weights ~ N(0, 0.02), lr {args.lr:g}, g {args.grad:g})\n\n"
                                    + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
