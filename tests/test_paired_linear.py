"""Paired mode's fused linear kernel (fastmezo.kernels.paired_linear) and the choice of path per module
(fastmezo.paired_linear), on the Triton backend: the interpreter on CPU, the compiled kernel on CUDA."""
import pytest
import torch

import fastmezo
from fastmezo import ops, oracle
from fastmezo.paired_linear import DEFAULT_MAX_ROWS, max_rows_of
from fastmezo.plan import Plan
from conftest import TRITON_DEVICE as DEVICE
from test_paired import EPS, Z_MAX, batch, tiny

pl = pytest.importorskip("fastmezo.kernels.paired_linear")
SEED = 0x0123456789ABCDEF
# Float32 accumulation error per unit of sum_k |x_k w_k| (K <= 512 terms, plus the oracle's float64
# sum), and the dtype's own rounding of y: 2 float32 ulp per term would be 1.2e-7 * K.
ACC_RTOL = 1e-4
OUT_RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def reference(x, w, eps, key, noise, offset, bias=None):
    """Plain torch with the oracle's z: (y, sum |x| |w_perturbed|) in float64."""
    z = oracle.noise(w.numel(), SEED, key, noise, offset=offset).reshape(w.shape)
    ez = z * torch.tensor(eps, dtype=torch.float32)
    h = x.shape[0] // 2
    ys, mags = [], []
    for rows, wp in ((x[:h], (w.float() + ez).to(w.dtype)), (x[h:], (w.float() - ez).to(w.dtype))):
        ys.append(rows.double() @ wp.double().T)
        mags.append(rows.double().abs() @ wp.double().abs().T)
    y, mag = torch.cat(ys), torch.cat(mags)
    if bias is not None:
        y, mag = y + bias.double(), mag + bias.double().abs()
    return y, mag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise,k,offset", [(0, 136, 40), (0, 8, 0), (1, 384, 256)])
@pytest.mark.parametrize("rows,split", [(26, 1), (300, 2)])
def test_kernel_matches_the_oracle(monkeypatch, dtype, noise, k, offset, rows, split):
    # Odd shapes: rows per half 13 (inside one row block) or 150 (two blocks, the second partial),
    # N = 37 and K not multiples of the blocks; the workspace (several splits) and the output (one split,
    # written by the kernel itself) are poisoned, so an unwritten element shows.
    monkeypatch.setattr(pl, "_workspace", lambda *a, **kw: torch.full(a[:3], float("nan"), device=DEVICE))
    monkeypatch.setattr(pl, "_output", lambda m, n, dt, dev: torch.full((m, n), float("nan"), dtype=dt, device=dev))
    g = torch.Generator().manual_seed(rows + k + noise)
    w = (torch.randn(37, k, generator=g) * 0.5).to(dtype)
    x = torch.randn(rows, k, generator=g).to(dtype)
    y = pl.paired_linear(x.to(DEVICE), w.to(DEVICE), 0.01, SEED, 5, noise, offset, split_k=split).cpu()
    ref, mag = reference(x, w, 0.01, 5, noise, offset)
    assert y.dtype == dtype and y.shape == (rows, 37) and torch.isfinite(y).all()
    tol = (ACC_RTOL + OUT_RTOL[dtype]) * mag + 1e-30
    assert ((y.double() - ref).abs() <= tol).all(), (y.double() - ref).abs().max()
    plain = (x.double() @ w.double().T)
    h = rows // 2                       # each half did see its own perturbed weight
    assert ((y[:h].double() - plain[:h]).abs() > tol[:h]).any() and ((y[h:].double() - plain[h:]).abs() > tol[h:]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", [0, 1])
def test_one_split_writes_the_bits_of_the_workspace_path(monkeypatch, dtype, noise):
    """With one split the kernel writes y itself, the bias added in float32 before its one rounding:
    the bits of the float32 workspace path (partial sums, bias added by torch, then rounded), with and
    without a bias; the direct output is poisoned first."""
    monkeypatch.setattr(pl, "_output", lambda m, n, dt, dev: torch.full((m, n), float("nan"), dtype=dt, device=dev))
    k, offset = (136, 40) if noise == 0 else (256, 128)
    g = torch.Generator().manual_seed(noise + 7)
    w = torch.randn(37, k, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(26, k, generator=g).to(dtype).to(DEVICE)
    bias_plus, bias_minus = (torch.randn(37, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    for biases in ((), (bias_plus, bias_minus)):
        direct = pl.paired_linear(x, w, 0.01, SEED, 5, noise, offset, *biases, split_k=1)
        spilled = pl.paired_linear(x, w, 0.01, SEED, 5, noise, offset, *biases, split_k=1, _direct=False)
        assert torch.isfinite(direct).all() and direct.dtype == dtype
        assert torch.equal(direct.view(-1).view(torch.uint8), spilled.view(-1).view(torch.uint8)), (dtype, biases != ())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_partials_are_summed_in_order_with_each_halfs_bias(monkeypatch, dtype, splits):
    # The bits of torch adding the partials in split order, then each half's bias in float32, then one
    # rounding; M x N not a multiple of the sum's block, and the output poisoned.
    monkeypatch.setattr(pl, "_output", lambda m, n, dt, dev: torch.full((m, n), float("nan"), dtype=dt, device=dev))
    g = torch.Generator().manual_seed(splits)
    parts = torch.randn(splits, 2 * 23, 57, generator=g)
    bias_plus, bias_minus = (torch.randn(57, generator=g).to(dtype) for _ in range(2))
    want = parts[0].clone()
    for p in parts[1:]:
        want += p
    for biases in ((None, None), (bias_plus, bias_minus)):
        got = pl.summed(parts.to(DEVICE), *(None if b is None else b.to(DEVICE) for b in biases), dtype).cpu()
        expect = want.clone()
        if biases[0] is not None:
            expect[:23] += bias_plus.float()
            expect[23:] += bias_minus.float()
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expect.to(dtype).view(torch.uint8))


def nearest_copy(plan, t, key, offset, eps, sign):
    """round(t + sign * eps*z) to nearest even, eps*z the backend's float32 product (the contract's pass
    with load_x off), the sum and rounding by torch: the materialize path's copy, computed independently
    of the pass that makes it."""
    ez = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    ops.run(plan.backend_of(t.device), [ez], None, [0.0], [eps], SEED, [key], [offset], plan.noise, False)
    return (t.float() + ez if sign > 0 else t.float() - ez).to(t.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", [0, 1])
def test_tiles_are_the_materialized_copies_bit_for_bit(dtype, noise):
    # Rows of the identity pick the perturbed weights out exactly (1 * w, plus zeros): the kernel's
    # rounded tiles must be the materialize path's copies, with the same backend's z; with a bias.
    k, offset = (24, 16) if noise == 0 else (128, 128)
    g = torch.Generator().manual_seed(noise)
    w = torch.randn(19, k, generator=g).to(dtype).to(DEVICE)
    bias = torch.randn(19, generator=g).to(dtype).to(DEVICE)
    plan = Plan([w, bias], keys=[5, 6], offsets=[offset, 0], noise=noise, backend="triton")
    copies = [nearest_copy(plan, t, key, off, 0.003, sign)
              for sign in (1, -1) for t, key, off in ((w, 5, offset), (bias, 6, 0))]
    eye = torch.eye(k, dtype=dtype, device=DEVICE)
    y = pl.paired_linear(torch.cat([eye, eye]), w, 0.003, SEED, 5, noise, offset)
    assert torch.equal(y[:k], copies[0].T) and torch.equal(y[k:], copies[2].T)
    assert not torch.equal(copies[0], w)
    y = pl.paired_linear(torch.cat([eye, eye]), w, 0.003, SEED, 5, noise, offset, copies[1], copies[3])
    assert torch.equal(y[:k], (copies[0].T.float() + copies[1].float()).to(dtype))
    assert torch.equal(y[k:], (copies[2].T.float() + copies[3].float()).to(dtype))


def test_unfusable_operands_are_refused_with_the_reason():
    w = torch.randn(4, 12)
    assert "multiple of 8" in pl.unfusable_reason(torch.randn(2, 12), w, 0, 0)
    assert "multiple of 8" in pl.unfusable_reason(torch.randn(2, 16), torch.randn(4, 16), 0, 4)
    assert "multiple of 128" in pl.unfusable_reason(torch.randn(2, 16), torch.randn(4, 16), 1, 0)
    assert "even number" in pl.unfusable_reason(torch.randn(3, 16), torch.randn(4, 16), 0, 0)
    assert "dtype" in pl.unfusable_reason(torch.randn(2, 16).half(), torch.randn(4, 16), 0, 0)
    with pytest.raises(ValueError, match="multiple of 8"):
        pl.paired_linear(torch.randn(2, 12), w, 0.1, 1, 0)


def step(kind, dtype, **options):
    model = tiny(kind, dtype).to(DEVICE)
    options = {"backend": "triton", **options}
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=3, mode="paired", **options) as handle:
        handle.step({k: v.to(DEVICE) for k, v in batch().items()})
        opt = handle.optimizer
        return model, (opt.loss_plus, opt.loss_minus, opt.projected_grad), dict(handle.paired.paths)


# Losses of the two paths differ only by the summation order of the matmuls: float32 sums, and in
# bfloat16 a flip of the rounding of some outputs (2**-8 relative each), averaged over the logits.
STEP_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_materialized_step(kind, dtype):
    fused, (lp, lm, g), paths = step(kind, dtype, fused=True)
    ref, (rlp, rlm, rg), ref_paths = step(kind, dtype, fused=False)
    linear = {n for n, m in fused.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, p in paths.items() if p == "fused"} == linear and len(linear) >= 13
    assert set(ref_paths.values()) == {"materialized", "gathered"} and set(ref_paths) == set(paths)
    assert paths["model.embed_tokens" if kind == "llama" else "model.decoder.embed_tokens"] == "gathered"
    assert lp != lm
    rtol = STEP_RTOL[dtype]
    assert lp == pytest.approx(rlp, rel=rtol) and lm == pytest.approx(rlm, rel=rtol)
    assert abs(g - rg) <= 2 * rtol * max(abs(rlp), abs(rlm)) / (2 * EPS)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        ulp = torch.finfo(dtype).eps * torch.maximum(p.detach().abs(), q.detach().abs()).float()
        assert ((p.float() - q.float()).abs() <= 0.05 * abs(g - rg) * Z_MAX + 2 * ulp + 1e-30).all(), name


def test_the_automatic_choice():
    assert max_rows_of(None) == DEFAULT_MAX_ROWS and max_rows_of(False) == 0 and max_rows_of(7) == 7
    with pytest.raises(ValueError, match="fused"):
        max_rows_of("yes")
    with pytest.raises(ValueError, match="mode='paired' only"):
        fastmezo.patch(tiny("opt", torch.float32), mode="exact", fused=True)

    def paths_of(**options):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 12),
                                    torch.nn.Linear(12, 4)).to(DEVICE)   # in-features 12: not a multiple of 8
        x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)   # doubled: 12 rows
        with fastmezo.patch(model, mode="paired", loss_fn=lambda m, b: m(b).pow(2).mean((1, 2)),
                            **{"backend": "triton", **options}) as handle:
            handle.step(x)
            return [handle.paired.paths[str(i)] for i in range(4)]
    assert paths_of() == ["materialized"] * 4              # automatic: the Hopper kernel only, never the Triton one
    assert paths_of(fused=12) == ["fused", "materialized", "fused", "materialized"]
    assert paths_of(fused=True) == ["fused", "materialized", "fused", "materialized"]
    assert paths_of(fused=11) == ["materialized"] * 4                           # threshold below the rows
    assert paths_of(fused=True, backend="oracle") == ["materialized"] * 4      # not the Triton backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", [0, 1])
@pytest.mark.parametrize("m_half", [1, 64, 128, 512])
def test_tiles_fit_shared_memory(monkeypatch, dtype, noise, m_half):
    # Every supported case must compile within an H100/H200's shared memory and an A100's (164 KiB);
    # the estimate reproduces what the compiler asked for float32, Rademacher, 128 rows a half, 3 stages.
    assert pl.shared_bytes(128, 64, 128, 4, 3) == 393216
    elem = torch.empty((), dtype=dtype).element_size()
    for limit in (pl.DEFAULT_SHARED, 167936):
        monkeypatch.setattr(pl, "_shared_limit", lambda device: limit)
        block_m, block_n, block_k, _, _, stages = pl._blocks(m_half, 4096, 4096, noise, torch.device("cpu"),
                                                             None, None, None, elem)
        assert pl.shared_bytes(block_m, block_n, block_k, elem, stages) <= limit - pl.SHARED_MARGIN
        assert block_m >= 16 and stages >= 2
        if elem == 2 and limit == pl.DEFAULT_SHARED:      # half precision keeps the full pipeline and row block
            assert stages == pl.STAGES and block_m == min(pl.MAX_BLOCK_M, max(16, 1 << (m_half - 1).bit_length()))
