"""bench.host_profile runs on CPU; repeated perturb_ calls reuse their validated plan (no Plan built)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.host_profile import main  # noqa: E402


def test_host_profile_on_cpu_reuses_the_plan():
    result = main(["--device", "cpu", "--model", "opt-125m", "--calls", "3", "--rows", "400"])
    assert result["tensors"] == 196
    assert len(result["host_ms"]) == 5 and all(ms > 0 for ms in result["host_ms"].values())
    assert "plan_cache.py" in result["profile"] and "(run)" in result["profile"]
    built = [line for line in result["profile"].splitlines() if "fastmezo/plan.py" in line and "(__init__)" in line]
    assert not built, f"perturb_ validated a new Plan on a repeated call: {built}"
