"""Paired mode's LayerNorm kernel (fastmezo.kernels.paired_layer_norm) and its use by paired forwards, on
the Triton backend: the interpreter on CPU, the compiled kernel on CUDA.

Tolerances: the kernel's statistics are float32 sums in another order than torch's, so against a float64
reference y may differ by a few float32 ulp of |y| before its rounding; after it, by one ulp of the
dtype (float32: rtol 1e-5 of the row's scale; float16 / bfloat16: one rounding, 2^-10 / 2^-7 relative
plus that)."""
import math

import pytest
import torch

from fastmezo.functional import perturbed
from fastmezo.paired import PairedPerturbation
from fastmezo.plan import Plan
from conftest import TRITON_DEVICE as DEVICE, ulp

pln = pytest.importorskip("fastmezo.kernels.paired_layer_norm")


def reference(x, shape, w, b, eps):
    """float64 LayerNorm of each half with its own affine (w, b: [2, *shape], [*shape] or None)."""
    n = math.prod(shape)
    x2 = x.double().reshape(-1, n)
    h = x2.shape[0] // 2
    mean = x2.mean(1, keepdim=True)
    y = (x2 - mean) / torch.sqrt(((x2 - mean) ** 2).mean(1, keepdim=True) + eps)
    out = []
    for half, rows in ((0, y[:h]), (1, y[h:])):
        for p, op in ((w, torch.mul), (b, torch.add)):
            if p is not None:
                rows = op(rows, (p[half] if p.numel() == 2 * n else p).double().reshape(n))
        out.append(rows)
    return torch.cat(out).reshape(x.shape)


def _poisoned(monkeypatch):
    """Every output element NaN until the kernel writes it."""
    original = pln._output
    monkeypatch.setattr(pln, "_output", lambda x2: original(x2).fill_(float("nan")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,lead", [((40,), (6, 3)), ((100,), (2, 1)), ((4, 10), (4,))])
@pytest.mark.parametrize("affine", ["per_half", "shared", "weight_only", "mixed", "none"])
def test_kernel_matches_the_reference(monkeypatch, dtype, shape, lead, affine):
    # Rows not a power of two (40, 100 elements), a multi-dimensional normalized shape, one row per half.
    _poisoned(monkeypatch)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(*lead, *shape, generator=g) * 3 + 1.5).to(dtype).to(DEVICE)

    def param(per_half, scale, centre):
        t = torch.randn(*((2,) if per_half else ()), *shape, generator=g) * scale + centre
        return t.to(dtype).to(DEVICE)
    w = b = None
    if affine in ("per_half", "shared", "weight_only", "mixed"):
        w = param(affine == "per_half", 0.5, 1.0)
    if affine in ("per_half", "shared"):
        b = param(affine == "per_half", 0.3, 0.0)
    if affine == "mixed":                   # the weight shared, the bias one per half
        b = param(True, 0.3, 0.0)
    y = pln.paired_layer_norm(x, shape, w, b, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype and not torch.isnan(y).any()
    ref = reference(x.cpu(), shape, None if w is None else w.cpu(), None if b is None else b.cpu(), 1e-5)
    err = (y.cpu().double() - ref).abs()
    # float32 statistics: a few float32 ulp of |y| (the row's scale is about 1) before the dtype's rounding
    bound = 1e-5 * (ref.abs() + 1) + (0 if dtype == torch.float32 else ulp(ref.to(dtype)).double())
    assert (err <= bound).all(), float((err - bound).max())
    # the two halves really use their own affine
    if affine == "per_half":
        h = x.shape[0] // 2
        assert not torch.equal(y[:h], pln.paired_layer_norm(x, shape, w.flip(0), b.flip(0), 1e-5)[:h])


def test_kernel_refuses_what_it_cannot_take():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="3 rows"):
        pln.paired_layer_norm(x, (8,))
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="does not end in"):
        pln.paired_layer_norm(x, (6,))
    with pytest.raises(ValueError, match="weight"):
        pln.paired_layer_norm(x, (8,), torch.ones(8, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="bias"):
        pln.paired_layer_norm(x, (8,), None, torch.ones(3, 8, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trained", ["both", "weight", "none"])
def test_paired_layer_norm_module_is_each_halfs_layer_norm_with_its_copies(dtype, trained, monkeypatch):
    """A paired forward of nn.LayerNorm on the Triton backend takes the kernel: each half is F.layer_norm
    with exact mode's copies of the trained parameters (a frozen one as stored), within the kernel's
    tolerance, in one launch (no concatenation)."""
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(24).to(dtype).to(DEVICE)
    with torch.no_grad():
        layer.weight.normal_(1.0, 0.3)
        layer.bias.normal_(0.0, 0.3)
    if trained != "both":
        layer.bias.requires_grad_(False)
    if trained == "none":
        layer.weight.requires_grad_(False)
    params = [p for p in layer.parameters() if p.requires_grad]
    model = torch.nn.Sequential(torch.nn.Linear(24, 24, bias=False), layer).to(dtype).to(DEVICE)
    params = [model[0].weight] + params
    keys = list(range(3, 3 + len(params)))
    plan = Plan(params, keys=keys, backend="triton")
    provider = PairedPerturbation(model, params, fused=False)
    x = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    cats = []
    original_cat = torch.cat
    with monkeypatch.context() as m:
        m.setattr(torch, "cat", lambda *a, **k: (cats.append(1), original_cat(*a, **k))[1])
        with provider.perturbation(plan, 9, [0.02]):
            y = model(x)
    assert cats == []
    halves = []
    for sign, rows in ((1, x[:2]), (-1, x[2:])):
        made = {id(p): perturbed(p.detach(), 9, sign * 0.02, keys=[k], backend="triton") for p, k in zip(params, keys)}
        h = torch.nn.functional.linear(rows, made[id(model[0].weight)])
        halves.append(torch.nn.functional.layer_norm(h, (24,), made.get(id(layer.weight), layer.weight.detach()),
                                                     made.get(id(layer.bias), layer.bias.detach()), layer.eps))
    expected = original_cat(halves)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
    torch.testing.assert_close(y, expected, rtol=tol, atol=tol)


def test_kernel_reads_copies_that_are_not_adjacent(monkeypatch):
    """The two copies of a parameter lie where a pair buffer put them (a [2, n] view whose rows are apart):
    the kernel reads them there, with the same result as from adjacent rows."""
    _poisoned(monkeypatch)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 40, generator=g).to(DEVICE)
    w_buffer = torch.randn(2, 56, generator=g).to(DEVICE)
    b_buffer = torch.randn(2, 72, generator=g).to(DEVICE)
    w, b = w_buffer[:, 8:48], b_buffer[:, 16:56]
    assert not w.is_contiguous() and w.stride(0) != b.stride(0)
    y = pln.paired_layer_norm(x, (40,), w, b, 1e-5)
    assert torch.equal(y, pln.paired_layer_norm(x, (40,), w.contiguous(), b.contiguous(), 1e-5))
    err = (y.cpu().double() - reference(x.cpu(), (40,), w.cpu(), b.cpu(), 1e-5)).abs()
    assert float(err.max()) < 1e-4
