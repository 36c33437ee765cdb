"""The README's plot: passes of run 10 (8eb0d56) and steps of run 4 (f74a371) in one figure.
Run from the repository root: python bench/results/2026-11-29-h200-s4/scripts/combine_plot.py"""
import json
import sys
from pathlib import Path

sys.path.insert(0, "bench")
import run_all  # noqa: E402

D = Path("bench/results/2026-11-29-h200-s4")
passes = json.loads((D / "10-final-8eb0d56/passes/results.json").read_text())["passes"]
steps = json.loads((D / "4-steps-f74a371/steps/results.json").read_text())["steps"]
run_all.plot(passes, steps, D / "summary.png",
             "fastmezo on NVIDIA H200 | torch 2.11.0+cu130 triton 3.6.0 CUDA 13.0 | passes 8eb0d56, steps f74a371")
print("wrote", D / "summary.png")
