"""Paired mode's perturbed copies (fastmezo.paired_copies) and its materialized nn.Linear path
(fastmezo.paired_linear.materialized_or_none): bit for bit what exact mode's copies and F.linear per half
give, on every backend that runs here; the pair launch prepared once per set of tensors and relocated
into each forward's buffer; the small tensors' buffers held between forwards and written again."""
import pytest
import torch

import fastmezo
from fastmezo import paired_copies
from fastmezo.functional import perturbed
from fastmezo.paired import PairedPerturbation
from fastmezo.paired_copies import ForwardCopies
from fastmezo.plan import Plan
from conftest import backend_devices

BACKENDS = backend_devices()


def weights(device, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(4)
    shapes = [(300, 40), (40,), (8, 5), (70000,)]       # large, small, small, large
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_prepared_pairs_relocate_into_each_forwards_buffer(backend, device):
    """Three forwards at different seeds over the same tensors: every copy is exact mode's, the large
    ones come from fresh buffers each time, the pair launch is prepared once (Triton), and the small
    tensors' buffer is the same one, written again."""
    ws = weights(device)
    keys, offsets = [3, 4, 5, 6], [0, 8, 16, 24]
    plan = Plan(ws, keys=keys, offsets=offsets, backend=backend)
    entries = {id(w): (k, o, 0.01) for w, k, o in zip(ws, keys, offsets)}
    held, small_ptrs, prepared = {}, set(), []
    for seed in (5, 6, 2**63 + 1):
        copies = ForwardCopies(plan, seed, entries, held)
        plus, minus = copies.pairs(ws)
        for w, k, o, p, m in zip(ws, keys, offsets, plus, minus):
            for sign, got in ((1, p), (-1, m)):
                want = perturbed(w, seed, sign * 0.01, keys=[k], offsets=[o], backend=backend)
                assert got.shape == w.shape and torch.equal(got, want), (seed, sign, tuple(w.shape))
        small_ptrs.add(plus[1].data_ptr())
        prepared.append(len(paired_copies._prepared))
    assert len(small_ptrs) == 1 and len(held) == 1          # the small ones: one held buffer, rewritten
    if backend == "triton":
        assert prepared[1] == prepared[2]                    # nothing prepared after the first forward


def test_a_moved_tensor_gets_its_own_launch():
    """The prepared launches are keyed by the tensors' addresses: a tensor replaced by another of the
    same shape (another address) is perturbed from its own values, never from the old address."""
    pytest.importorskip("triton")
    from conftest import TRITON_DEVICE

    w = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    plan = Plan([w], keys=[3], backend="triton")
    first = ForwardCopies(plan, 5, {id(w): (3, 0, 0.01)}).pairs([w])[0][0].clone()
    w2 = w * 2
    plan2 = Plan([w2], keys=[3], backend="triton")
    second = ForwardCopies(plan2, 5, {id(w2): (3, 0, 0.01)}).pairs([w2])[0][0]
    assert torch.equal(second, perturbed(w2, 5, 0.01, keys=[3], backend="triton"))
    assert not torch.equal(second, first)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bias", ["trained", "frozen", None])
@pytest.mark.parametrize("slab", [None, 72])     # 72 elements: copies made 3 output rows at a time
def test_materialized_linear_is_f_linear_per_half(backend, device, bias, slab, monkeypatch):
    """A plain nn.Linear on the materialized path: its output is F.linear of each half with exact mode's
    copies (on the CPU bit for bit: one batched product of the halves), for 3-D inputs, with a trained, a frozen
    or no bias, whole or with the copies made a slab of output rows at a time (10 rows: 3 + 3 + 3 + 1)."""
    if slab is not None:
        monkeypatch.setattr(paired_copies, "MAX_COPY_BYTES", slab * 4)   # float32
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 10, bias=bias is not None).to(device)
    if bias == "frozen":
        layer.bias.requires_grad_(False)
    trained = [p for p in layer.parameters() if p.requires_grad]
    keys = list(range(7, 7 + len(trained)))
    plan = Plan(trained, keys=keys, backend=backend)
    provider = PairedPerturbation(layer, trained, fused=False)
    x = torch.randn(4, 3, 24, generator=torch.Generator().manual_seed(2)).to(device)
    with provider.perturbation(plan, 9, [0.02]):
        y = layer(x)
    assert provider.paths == {"<root>": "materialized"}
    halves = []
    for sign, rows in ((1, x[:2]), (-1, x[2:])):
        w = perturbed(layer.weight.detach(), 9, sign * 0.02, keys=[7], backend=backend)
        b = layer.bias
        if bias == "trained":
            b = perturbed(layer.bias.detach(), 9, sign * 0.02, keys=[8], backend=backend)
        halves.append(torch.nn.functional.linear(rows, w, None if b is None else b.detach()))
    if device == "cpu" and slab is None:
        assert torch.equal(y, torch.cat(halves))
    else:   # narrower products (slabs), cuBLAS's kernels: float32 sums in another order
        torch.testing.assert_close(y, torch.cat(halves), rtol=1e-5, atol=1e-6)


def test_lm_head_slabs_are_aligned_rows(monkeypatch):
    """A weight above MAX_COPY_BYTES gets its copies a slab of output rows at a time, each slab a multiple
    of SLAB_ALIGN rows (cuBLAS's fast kernels need aligned rows): 10 rows of which 7 fit -> 4 + 4 + 2,
    and the output is still F.linear of each half with exact mode's copies."""
    from fastmezo import paired_linear
    monkeypatch.setattr(paired_copies, "MAX_COPY_BYTES", 7 * 24 * 4)      # 7 float32 rows of 24
    monkeypatch.setattr(paired_linear, "SLAB_ALIGN", 4)
    layer = torch.nn.Linear(24, 10, bias=False)
    plan = Plan([layer.weight], keys=[7])
    provider = PairedPerturbation(layer, fused=False)
    offsets = []
    original = ForwardCopies.pair_pass
    monkeypatch.setattr(ForwardCopies, "pair_pass",
                        lambda self, src, *rest: (offsets.append(rest[3][0]), original(self, src, *rest))[1])
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(2))
    with provider.perturbation(plan, 9, [0.02]):
        y = layer(x)
    assert offsets == [0, 4 * 24, 8 * 24]
    halves = [torch.nn.functional.linear(rows, perturbed(layer.weight.detach(), 9, sign * 0.02, keys=[7]))
              for sign, rows in ((1, x[:2]), (-1, x[2:]))]
    torch.testing.assert_close(y, torch.cat(halves), rtol=1e-5, atol=1e-6)


def test_linear_under_autocast_takes_the_generic_path():
    # autocast changes what F.linear computes: the module's own forward must run it, once per half.
    layer = torch.nn.Linear(8, 4)
    plan = Plan(list(layer.parameters()), keys=[1, 2])
    provider = PairedPerturbation(layer, fused=False)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16), provider.perturbation(plan, 9, [0.02]):
        y = layer(x)
    assert y.dtype == torch.bfloat16


def test_patch_paired_uses_the_materialized_linear_path():
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with fastmezo.patch(model, mode="paired", fused=False, loss_fn=lambda m, b: m(b).pow(2).mean(1)) as handle:
        handle.step(x)
        assert handle.paired.paths == {"0": "materialized", "1": "materialized", "2": "materialized"}


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_copies_of_a_run_of_modules_come_from_one_pass(backend, device, monkeypatch):
    """After the first forward, the weights asked for after one (the previous forward's order) get their
    copies from the same pass, up to MAX_COPY_BYTES a copy: the same steps bit for bit as one pass per
    module, in fewer passes; and a forward in another order is still right."""
    from test_paired import batch, tiny

    made = []
    real = ForwardCopies._made_pairs
    monkeypatch.setattr(ForwardCopies, "_made_pairs", lambda self, ts: (made.append(len(ts)), real(self, ts))[1])
    monkeypatch.setattr(paired_copies, "SMALL_NUMEL", 100)      # the tiny model's weights count as large
    results = []
    for group in (8192, 1 << 28):         # 8192 bytes: the largest weight, two 32 x 32 ones at most
        monkeypatch.setattr(paired_copies, "MAX_COPY_BYTES", group)
        made.clear()
        model = tiny("opt", torch.float32).to(device)
        with fastmezo.patch(model, lr=0.05, eps=1e-2, seed=3, mode="paired", backend=backend) as handle:
            steps = []
            for _ in range(3):
                handle.step({k: v.to(device) for k, v in batch().items()})
                steps.append((handle.optimizer.loss_plus, handle.optimizer.loss_minus))
        results.append((steps, [p.detach().clone() for p in model.parameters()], list(made)))
    (steps0, weights0, made0), (steps1, weights1, made1) = results
    assert steps0 == steps1 and all(torch.equal(a, b) for a, b in zip(weights0, weights1))
    assert max(made0) == 2 and len(made1) < len(made0) and max(made1) > 4, (made0, made1)


def test_copies_made_ahead_are_right_in_any_order(monkeypatch):
    """The order of the previous forward is only a guess: asked for in another order, with a tensor asked
    twice and one never, every stacked pair is still exact mode's copies."""
    monkeypatch.setattr(paired_copies, "SMALL_NUMEL", 100)
    gen = torch.Generator().manual_seed(6)
    ws = [torch.randn(30, 20, generator=gen) for _ in range(4)]
    plan = Plan(ws, keys=[1, 2, 3, 4])
    copies = ForwardCopies(plan, 8, {id(w): (k, 0, 0.01) for w, k in zip(ws, [1, 2, 3, 4])}, order=ws)
    for i in (2, 0, 1, 1):
        both = copies.stacked(ws[i])
        for sign, got in ((1, both[0]), (-1, both[1])):
            assert torch.equal(got, perturbed(ws[i], 8, sign * 0.01, keys=[i + 1]))
    assert [id(t) for t in copies.asked] == [id(ws[i]) for i in (2, 0, 1, 1)]


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_is_f_layer_norm_per_half_bit_for_bit(bias):
    norm = torch.nn.LayerNorm(12, bias=bias)
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_(generator=torch.Generator().manual_seed(3))
    trained = list(norm.parameters())
    plan = Plan(trained, keys=list(range(1, 1 + len(trained))))
    provider = PairedPerturbation(norm)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(4))
    with provider.perturbation(plan, 9, [0.02]):
        y = norm(x)
    halves = []
    for sign, rows in ((1, x[:2]), (-1, x[2:])):
        w, b = (perturbed(p.detach(), 9, sign * 0.02, keys=[i + 1]) for i, p in enumerate(trained)) if bias else (
            perturbed(norm.weight.detach(), 9, sign * 0.02, keys=[1]), None)
        halves.append(torch.nn.functional.layer_norm(rows, (12,), w, b, norm.eps))
    assert torch.equal(y, torch.cat(halves))
