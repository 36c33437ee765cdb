"""A model split over devices in one process (issue 16 item 3: accelerate's device_map, pipeline
style): every pass runs per device, on that device's backend, and the result equals the same steps
with the whole model on the CPU. Skipped without CUDA.

Rademacher noise makes the comparison exact: its z and the pass arithmetic are bit for bit the same on
every backend (docs/noise.md section 3), so a split model and a CPU model given the same losses end
bit-identical. The losses come from a float64 function of the weights computed on the CPU, so they
do not depend on where each layer ran.

    python -m pytest -m gpu tests/test_gpu_split.py
"""
import pytest
import torch

import fastmezo

from conftest import HAS_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def _model(dtype):
    g = torch.Generator().manual_seed(11)
    layers = [torch.nn.Linear(48, 40), torch.nn.LayerNorm(40), torch.nn.Linear(40, 24), torch.nn.Linear(24, 8)]
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _loss(model):
    # float64 on the CPU: the same number wherever the parameters live.
    return sum(((p.detach().double().cpu() - 0.1) ** 2 * (i + 1)).sum() for i, p in enumerate(model.parameters()))


@pytest.mark.parametrize("dtype,rounding", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_split_model_steps_equal_the_cpu_model(dtype, rounding):
    cpu = _model(dtype)
    split = _model(dtype)
    split[0].to("cuda")
    split[2].to("cuda")                      # layers 1 and 3 stay on the CPU
    devices = {p.device.type for p in split.parameters()}
    assert devices == {"cpu", "cuda"}
    opts = dict(lr=1e-3, eps=1e-2, weight_decay=0.01, noise="rademacher", seed=1234, stochastic_rounding=rounding)
    opt_cpu = fastmezo.MeZO(cpu.named_parameters(), **opts)
    opt_split = fastmezo.MeZO(split.named_parameters(), **opts)
    before = [p.detach().cpu().clone() for p in split.parameters()]
    for _ in range(5):
        l_cpu = opt_cpu.step(lambda: _loss(cpu))
        l_split = opt_split.step(lambda: _loss(split))
        assert float(l_cpu) == float(l_split)
    for (name, a), b, b0 in zip(cpu.named_parameters(), split.parameters(), before):
        assert not torch.equal(b.detach().cpu(), b0), name                    # the steps moved it
        assert torch.equal(a.detach().view(torch.uint8), b.detach().cpu().view(torch.uint8)), name
