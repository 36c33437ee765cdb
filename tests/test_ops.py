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


def test_run_restores_grad_mode_also_when_the_pass_raises(monkeypatch):
    """functional._run switches autograd off around the pass (a mutation of a leaf that requires grad
    is an autograd error otherwise) and back on afterwards, also when the pass raises; empty tensors
    are skipped without touching the others' arguments."""
    from fastmezo import _ops, functional as F

    calls = []
    monkeypatch.setattr(_ops, "call_axpbz_", lambda *args: calls.append((torch.is_grad_enabled(), args)))
    x, empty, y = torch.ones(3), torch.ones(0), torch.ones(2)
    assert torch.is_grad_enabled()
    F._run([x, empty, y], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], 7, [0, 1, 2], [0, 0, 9], 0, None)
    (grad_inside, args), = calls
    assert grad_inside is False and torch.is_grad_enabled()
    tensors, a, b, _, keys, offsets = args[:6]
    assert [t is x or t is y for t in tensors] == [True, True] and a == [1.0, 3.0] and b == [4.0, 6.0]
    assert keys == [0, 2] and offsets == [0, 9]

    def boom(*args):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(_ops, "call_axpbz_", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        F._run([x], [1.0], [1.0], 7, [0], [0], 0, None)
    assert torch.is_grad_enabled()
