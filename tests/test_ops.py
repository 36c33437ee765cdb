"""The torch.library operator behind every pass: schema with mutation annotation, fake (meta)
implementation, and torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch)
on each backend that runs here."""
import pytest
import torch

import fastmezo  # noqa: F401  (registers the ops)
from conftest import backend_devices


def test_schema_declares_the_mutation():
    schema = str(torch.ops.fastmezo.axpbz_.default._schema)
    assert "Tensor(a0!)[] tensors" in schema or "Tensor(a!)[] tensors" in schema, schema


@pytest.mark.parametrize("backend,device", backend_devices())
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(10, generator=gen).to(device), torch.randn(3, 4, generator=gen).to(device).half()]
    args = (tensors, [1.0, 0.5], [0.1, -0.2], 5, [0, 1], [0, 3], 0, True, backend)
    torch.library.opcheck(torch.ops.fastmezo.axpbz_.default, args)


def test_fake_impl_changes_nothing_and_runs_on_meta():
    """Meta tensors go through the fake implementation (shape propagation only)."""
    t = [torch.empty(7, device="meta")]
    assert torch.ops.fastmezo.axpbz_(t, [1.0], [1.0], 1, [0], [0], 0, True, "auto") is None
