"""Paired mode's warp-specialized linear kernel (fastmezo.kernels.paired_linear_ws): compiled for Hopper
only (Gluon has no interpreter), so the kernel's tests run on an H100/H200 and the refusals everywhere."""
import pytest
import torch

import fastmezo
from fastmezo import paired_linear as policy
from test_paired import EPS, batch, tiny
from test_paired_linear import ACC_RTOL, OUT_RTOL, SEED, reference

ws = pytest.importorskip("fastmezo.kernels.paired_linear_ws")   # triton with Gluon (3.5 and later)
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not HOPPER, reason="the warp-specialized kernel runs on Hopper GPUs only")
PROBE_EPS = 0.1


def poison(monkeypatch):
    """Outputs and workspaces start as NaN, so an element the kernel does not write shows."""
    monkeypatch.setattr(ws, "_output", lambda m, n, dt, dev: torch.full((m, n), float("nan"), dtype=dt, device=dev))
    monkeypatch.setattr(ws, "_workspace", lambda *a: torch.full(a[:3], float("nan"), device=a[3]))
    monkeypatch.setattr(policy._kernel()[0], "_output",          # the split partials' sum writes y there
                        lambda m, n, dt, dev: torch.full((m, n), float("nan"), dtype=dt, device=dev))


@hopper_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k,offset,split", [
    (26, 37, 136, 40, 1),          # one partial row block, N and K not multiples of the tiles
    (300, 70, 1000, 8, 1),         # two row blocks of each half, the second partial
    (256, 200, 2048, 0, 3),        # three splits of K: float32 partial sums, then their sum's launch
    (128, 5120, 512, 16, None),    # the automatic split
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_the_oracle(monkeypatch, dtype, rows, n, k, offset, split, with_bias):
    poison(monkeypatch)
    g = torch.Generator().manual_seed(rows + n + k)
    w = (torch.randn(n, k, generator=g) * 0.5).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    b_plus = torch.randn(n, generator=g).to(dtype) if with_bias else None
    b_minus = torch.randn(n, generator=g).to(dtype) if with_bias else None
    cuda = lambda t: None if t is None else t.cuda()                    # noqa: E731
    # eps large enough that each half's perturbation shows above bfloat16's rounding of y at K = 2048
    y = ws.paired_linear(x.cuda(), w.cuda(), PROBE_EPS, SEED, 5, 0, offset, cuda(b_plus), cuda(b_minus),
                         split=split).cpu()
    h = rows // 2
    ref_p, mag_p = reference(x, w, PROBE_EPS, 5, 0, offset, b_plus)
    ref_m, mag_m = reference(x, w, PROBE_EPS, 5, 0, offset, b_minus)
    ref, mag = torch.cat([ref_p[:h], ref_m[h:]]), torch.cat([mag_p[:h], mag_m[h:]])
    assert y.dtype == dtype and y.shape == (rows, n) and torch.isfinite(y).all()
    tol = (ACC_RTOL + OUT_RTOL[dtype]) * mag + 1e-30
    assert ((y.double() - ref).abs() <= tol).all(), ((y.double() - ref).abs() / tol).max()
    plain = x.double() @ w.double().T + (0 if b_plus is None else torch.cat(
        [b_plus.double().expand(h, n), b_minus.double().expand(h, n)]))
    # each half did see its own perturbed weight
    assert ((y[:h].double() - plain[:h]).abs() > tol[:h]).any() and ((y[h:].double() - plain[h:]).abs() > tol[h:]).any()


@hopper_only
def test_the_fused_path_takes_it_on_hopper(monkeypatch):
    calls = []
    kernel = ws.paired_linear
    monkeypatch.setattr(ws, "paired_linear", lambda *a, **kw: calls.append(a[1].shape) or kernel(*a, **kw))
    model = tiny("opt", torch.bfloat16).cuda()
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=3, mode="paired", fused=True, backend="triton") as handle:
        handle.step({k: v.cuda() for k, v in batch().items()})
        paths = dict(handle.paired.paths)
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, p in paths.items() if p == "fused"} == linear
    assert len(calls) == len(linear)


@hopper_only
def test_the_automatic_choice_fuses_one_block_of_rows_a_half():
    # By default the Hopper kernel takes a doubled batch of up to DEFAULT_MAX_ROWS rows (here 2 x 3 x 10),
    # the copies a larger one (2 x 5 x 30); in CUDA graphs as eagerly.
    model = tiny("opt", torch.float16).cuda()
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for rows, length, want in ((3, 10, "fused"), (5, 30, "materialized")):
        assert (2 * rows * length <= policy.DEFAULT_MAX_ROWS) == (want == "fused")
        data = {k: v.cuda() for k, v in batch(rows, length).items()}
        with fastmezo.patch(model, lr=0.0, eps=EPS, seed=3, mode="paired") as handle:
            for _ in range(4):               # two eager steps, a capture, a replay
                handle.step(data)
            assert {handle.paired.paths[name] for name in linear} == {want}
            assert handle.graphs.captured == 1 and handle.graphs.failed == 0


def test_unfusable_operands_are_refused_with_the_reason():
    half = dict(dtype=torch.float16)
    assert "Rademacher" in ws.unfusable_reason(torch.randn(2, 16, **half), torch.randn(4, 16, **half), 1, 0)
    assert "dtypes" in ws.unfusable_reason(torch.randn(2, 16), torch.randn(4, 16), 0, 0)
    assert "dtypes" in ws.unfusable_reason(torch.randn(2, 16, **half), torch.randn(4, 16, dtype=torch.bfloat16), 0, 0)
    assert "CUDA" in ws.unfusable_reason(torch.randn(2, 16, **half), torch.randn(4, 16, **half), 0, 0)
    if HOPPER:
        w = torch.randn(4, 16, device="cuda", **half)
        assert "odd" in ws.unfusable_reason(torch.randn(3, 16, device="cuda", **half), w, 0, 0)
        assert "multiple of 8" in ws.unfusable_reason(torch.randn(2, 16, device="cuda", **half), w, 0, 4)
        odd_address = torch.randn(40, device="cuda", **half)[1:33].view(2, 16)
        assert "aligned" in ws.unfusable_reason(odd_address, w, 0, 0)
        with pytest.raises(ValueError, match="odd"):
            ws.paired_linear(torch.randn(3, 16, device="cuda", **half), w, 0.1, 1, 0)


def test_the_split_fills_the_gpu_within_its_bounds():
    assert ws.default_split(132, 80, 132) == 1 and ws.default_split(320, 80, 132) == 1     # tiles fill the GPU
    assert ws.default_split(80, 80, 132) == 3                                               # about 2 per SM
    assert ws.default_split(1, 80, 132) == ws.MAX_SPLIT                                     # bounded workspace
    assert ws.default_split(1, 2 * ws.MIN_SPLIT_TILES, 132) == 2                            # splits stay long
    assert ws.default_split(1, ws.MIN_SPLIT_TILES - 1, 132) == 1


def test_the_policy_finds_the_kernel_or_none():
    assert policy._kernel("paired_linear_ws")[0] is ws


@hopper_only
def test_fused_forwards_are_captured_in_cuda_graphs_and_match_eager_steps():
    from test_paired_graphs import batches, tiny_opt
    data = batches("cuda")

    def steps(cuda_graphs):
        model = tiny_opt(torch.float16, "cuda")
        with fastmezo.patch(model, lr=0.05, eps=EPS, seed=5, mode="paired", fused=True,
                            cuda_graphs=cuda_graphs) as handle:
            recs = []
            for b in data:
                handle.step(b)
                recs.append((handle.optimizer.loss_plus, handle.optimizer.loss_minus, handle.optimizer.projected_grad))
            assert {p for n, p in handle.paired.paths.items() if "proj" in n or "fc" in n} == {"fused"}
            return handle.graphs, recs, [p.detach().float() for p in model.parameters()]

    _, want, want_params = steps(False)
    graphs, got, got_params = steps(True)
    assert (graphs.captured, graphs.failed) == (2, 0) and graphs.replayed == 2
    for (lp, lm, _), (wp, wm, _) in zip(got, want):
        assert lp == pytest.approx(wp, rel=2e-3) and lm == pytest.approx(wm, rel=2e-3)
    assert len({r[2] for r in got}) == len(got)              # new seeds every step, not one replayed z
    for a, b in zip(got_params, want_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
