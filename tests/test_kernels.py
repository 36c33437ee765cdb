"""The fused passes of fastmezo.functional (perturb_, restore_and_update_, scale_and_add_noise_, make_noise) on every
backend that runs here, against plain torch that takes z explicitly from the oracle
(fastmezo.oracle.noise).

Tolerances (every comparison below uses `_assert_pass_close`; the bound is elementwise):
  * the pass computes a * x + b * z in float32 and rounds once to x's dtype. Against the exact value
    (float64 of the same formula, z from the float64 oracle):
      - |error| <= one ulp of the dtype at the result (covers the final rounding, and for float16 /
        bfloat16 the double rounding float32 -> dtype: at most 1 ulp of the dtype);
      - + 2**-22 * (|a x| + |b z|): float32 rounding of a, b, the two products and the sum (4 roundings
        of 2**-24 relative each, relative to the inputs; matters for float32 only, and when a x and
        b z cancel). For float32 this makes the bound a few ulp, i.e. rel ~ 1e-6 of the inputs;
      - + |b| * NORMAL_ATOL * (1 + |z|): the documented difference between a fast backend's normals
        (float32 transcendentals) and the oracle's (zero for the reference backend and for Rademacher).
  * triton vs reference on the same input: the two results may each be off by the bound above.
  * Rademacher perturbations with alpha a power of 2 are exact (b z = +-alpha exactly, one rounding of
    x + b z), so there the two backends must agree bit for bit.
"""
import math

import pytest
import torch

from conftest import HAS_CUDA, NORMAL_ATOL, TRITON_DEVICE, backend_devices, ulp

from fastmezo import functional as F
from fastmezo import oracle as R
from fastmezo.noise import Noise, key_from_name

BACKENDS = backend_devices()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Empty, one element, less than a Philox call, an odd count below and above a 4096-element block,
# and odd 2-D / 3-D shapes (their flat index must be used, not a per-dimension one).
SHAPES = [(0,), (1,), (3,), (127,), (4097,), (7, 13), (3, 5, 11)]
SHAPE_IDS = ["0", "1", "3", "127", "4097", "7x13", "3x5x11"]

all_cases = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
all_dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
all_backends = pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed: int) -> torch.Tensor:
    """Fresh random weights (CPU), N(0, 1) rounded to dtype."""
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def _z(shape, seed, key, noise="gaussian", offset=0) -> torch.Tensor:
    """The oracle's z for a tensor of this shape (float32, CPU)."""
    n = math.prod(shape)
    return R.noise(n, seed, key, noise, offset).reshape(shape)


def _run_on(device, x_cpu: torch.Tensor, fn) -> torch.Tensor:
    """Copy x to device, apply fn to the copy in place, return the result on the CPU."""
    x = x_cpu.clone().to(device)
    fn(x)
    return x.cpu()


def _assert_pass_close(got, x, a, b, z, exact=None):
    """got (dtype of x) against a * x + b * z, with the tolerance of the module docstring.
    exact: the float64 value of the pass if the caller computes it from its own formula."""
    assert got.dtype == x.dtype and got.shape == x.shape
    x64, z64 = x.double(), z.double()
    if exact is None:
        exact = a * x64 + b * z64
    expected = exact.to(x.dtype)
    tol = (torch.maximum(ulp(got), ulp(expected)).double()
           + 2.0 ** -22 * (abs(a) * x64.abs() + abs(b) * z64.abs())
           + abs(b) * NORMAL_ATOL * (1 + z64.abs()))
    err = (got.double() - exact).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), (f"{int(bad.sum())} of {got.numel()} elements off; worst error "
                                 f"{float(err.max())}, tolerance there {float(tol.flatten()[err.flatten().argmax()])}")


# ------------------------------------------------------------------------------------------------
# The three passes against plain torch
# ------------------------------------------------------------------------------------------------

@all_backends
@all_dtypes
@all_cases
def test_perturb_matches_plain_torch(backend, device, dtype, shape):
    """perturb_(x, seed, alpha) gives (x.float() + alpha * z).to(dtype) with z the oracle's noise of key 0,
    for Gaussian and Rademacher, a small (MeZO-like) and a large negative alpha, and a seed with the top
    bit set. Tolerance: module docstring (fp32 a few ulp; fp16/bf16 one ulp of the dtype)."""
    x = _rand(shape, dtype, seed=1)
    for noise, alpha, seed in [("gaussian", 1e-3, 17), ("gaussian", -0.75, 2**63 + 5),
                               ("rademacher", 0.3, 2**64 - 1)]:
        z = _z(shape, seed, 0, noise)
        got = _run_on(device, x, lambda t: F.perturb_(t, seed, alpha, noise=noise, backend=backend))
        expected = (x.float() + alpha * z).to(dtype)  # the plain-torch definition
        _assert_pass_close(got, x, 1.0, alpha, z, exact=x.double() + alpha * z.double())
        assert bool(((got.float() - expected.float()).abs()
                     <= 2 * torch.maximum(ulp(got), ulp(expected)) + abs(alpha) * NORMAL_ATOL * (1 + z.abs())).all())


RESTORE_HYPER = [  # (eps, lr, weight_decay, projected_grad)
    (1e-3, 1e-2, 0.0, 0.7),
    (1e-3, 1e-3, 0.1, -3.0),
    (1e-2, 0.5, 0.01, 25.0),
    (1e-3, 0.0, 0.0, 1.0),
    (5e-4, 2e-2, 0.5, 0.0),
]


@all_backends
@all_dtypes
@all_cases
def test_restore_and_update_matches_formula(backend, device, dtype, shape):
    """restore_and_update_ on theta (= weights at theta0 - eps z) gives
    (1 - lr wd) (theta + eps z) - lr g z, evaluated in float64 from that formula (not from the kernel's
    a, b rewriting), for several lr, weight decay and projected gradients, including lr = 0 and g = 0."""
    theta = _rand(shape, dtype, seed=2)
    seed = 1234567
    z = _z(shape, seed, 0)
    for eps, lr, wd, g in RESTORE_HYPER:
        got = _run_on(device, theta, lambda t: F.restore_and_update_(
            t, seed, eps, lr, g, weight_decay=wd, backend=backend))
        t64, z64 = theta.double(), z.double()
        exact = (1 - lr * wd) * (t64 + eps * z64) - lr * g * z64
        a = 1 - lr * wd
        _assert_pass_close(got, theta, a, a * eps - lr * g, z, exact=exact)


@all_backends
def test_restore_and_update_per_tensor_lists(backend, device):
    """lr and weight_decay given per tensor (e.g. no decay for biases) reach the right tensor; tensors
    of different dtypes and shapes in one call each get the noise of their default key 0, 1, 2, 3."""
    tensors = [_rand((33, 5), torch.float32, 3), _rand((130,), torch.float16, 4),
               _rand((2, 3, 7), torch.bfloat16, 5), _rand((1,), torch.float32, 6)]
    lrs, wds = [1e-2, 1e-3, 0.1, 0.0], [0.0, 0.1, 0.5, 0.2]
    eps, g, seed = 1e-3, -2.5, 99
    moved = [t.clone().to(device) for t in tensors]
    F.restore_and_update_(moved, seed, eps, lrs, g, weight_decay=wds, backend=backend)
    for key, (t, got, lr, wd) in enumerate(zip(tensors, moved, lrs, wds)):
        z = _z(t.shape, seed, key)
        t64, z64 = t.double(), z.double()
        exact = (1 - lr * wd) * (t64 + eps * z64) - lr * g * z64
        a = 1 - lr * wd
        _assert_pass_close(got.cpu(), t, a, a * eps - lr * g, z, exact=exact)


@all_backends
@all_dtypes
@all_cases
def test_scale_and_add_noise_matches_formula(backend, device, dtype, shape):
    """scale_and_add_noise_(x, a, b, seed) gives a x + b z for a != 1 (including a = 0, which must drop x entirely,
    and a < 0), Gaussian and Rademacher noise, and a non-zero offset."""
    x = _rand(shape, dtype, seed=7)
    for a, b, noise, offset in [(0.5, 2.0, "gaussian", 0), (-1.25, 0.01, "rademacher", 0),
                                (0.0, 1.0, "gaussian", 0), (0.9, -0.3, "gaussian", 2**32 - 3)]:
        z = _z(shape, 5, 0, noise, offset)
        got = _run_on(device, x, lambda t: F.scale_and_add_noise_(t, a, b, 5, noise=noise, offsets=[offset],
                                                     backend=backend))
        _assert_pass_close(got, x, a, b, z)


@all_backends
def test_scale_and_add_noise_per_tensor_coefficients(backend, device):
    """Per-tensor a and b lists, explicit keys (top bit set, all ones) and per-tensor offsets reach the
    right tensor."""
    xs = [_rand((300,), torch.float32, 8), _rand((5, 9), torch.float16, 9), _rand((1000,), torch.bfloat16, 10)]
    a, b = [0.5, 1.5, -1.0], [2.0, -0.25, 0.125]
    keys, offsets = [7, 2**31 + 3, 2**32 - 1], [0, 131, 2**40 + 5]
    moved = [x.clone().to(device) for x in xs]
    F.scale_and_add_noise_(moved, a, b, 31, keys=keys, offsets=offsets, backend=backend)
    for x, got, a_i, b_i, k, o in zip(xs, moved, a, b, keys, offsets):
        _assert_pass_close(got.cpu(), x, a_i, b_i, _z(x.shape, 31, k, "gaussian", o))


@all_backends
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_make_noise_and_noise_like(backend, device, dtype):
    """make_noise / noise_like return the oracle's z (rounded to the requested dtype), with the right
    shape, dtype and device, for both distributions, keys and offsets; numel 0 gives an empty tensor."""
    for noise, key, offset, n in [("gaussian", 0, 0, 4097), ("gaussian", 2**32 - 1, 6, 130),
                                  ("rademacher", 12, 0, 1000), ("rademacher", 3, 2**31 + 1, 257)]:
        out = F.make_noise(n, 88, key, noise=noise, offset=offset, device=device, dtype=dtype, backend=backend)
        assert out.shape == (n,) and out.dtype == dtype and out.device.type == torch.device(device).type
        z = R.noise(n, 88, key, noise, offset)
        _assert_pass_close(out.cpu(), torch.zeros(n, dtype=dtype), 0.0, 1.0, z)
    like = F.noise_like(torch.empty(7, 13, device=device), 88, 4, noise="gaussian", backend=backend)
    assert like.shape == (7, 13) and like.dtype == torch.float32
    _assert_pass_close(like.cpu(), torch.zeros(7, 13), 0.0, 1.0, _z((7, 13), 88, 4))
    assert F.make_noise(0, 88, device=device, dtype=dtype, backend=backend).shape == (0,)


# ------------------------------------------------------------------------------------------------
# Every element written, nothing else written
# ------------------------------------------------------------------------------------------------

SPANS = [(1, 0), (3, 1), (127, 5), (129, 130), (1000, 3), (4097, 2**32 - 3), (5003, 127)]  # (n, offset)
# The raw-launcher tests below run small blocks (one interpreted program per block): shorter spans.
LAUNCHER_SPANS = [(1, 0), (3, 1), (127, 5), (129, 130), (1000, 3), (1500, 2**32 - 3)]


@all_backends
def test_make_noise_writes_every_element(backend, device, monkeypatch):
    """make_noise allocates with torch.empty and never reads it (load_x=False): poison every new buffer
    with NaN and check no NaN is left, for lengths not multiples of 4 / 128 and unaligned offsets."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    for noise in ("gaussian", "rademacher"):
        for n, offset in SPANS:
            for dtype in DTYPES:
                out = F.make_noise(n, 3, 1, noise=noise, offset=offset, device=device, dtype=dtype,
                                   backend=backend)
                assert not bool(out.isnan().any()), (noise, n, offset, dtype)


@pytest.mark.parametrize("block", [None, 128, 1024])
def test_kernel_load_x_false_writes_every_element(triton_device, block):
    """The raw launcher with load_x=False into a NaN-poisoned buffer leaves no NaN (and gives b z)."""
    from fastmezo.kernels import axpbz_ as launch

    for kind in (0, 1):
        for n, offset in LAUNCHER_SPANS:
            buf = torch.full((n,), float("nan"), device=triton_device)
            launch(buf, 0.0, 2.0, 55, 9, kind, offset=offset, block=block, load_x=False)
            assert not bool(buf.isnan().any()), (kind, n, offset)
            z = R.noise(n, 55, 9, Noise(kind), offset)
            _assert_pass_close(buf.cpu(), torch.zeros(n), 0.0, 2.0, z)


@all_backends
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_views_leave_neighbours_untouched(backend, device, dtype):
    """Run the pass on a contiguous view buf[pad:pad+n] of a larger buffer whose head and tail hold
    sentinels: the sentinels are bit-identical afterwards (no write before the start, where the first
    tile begins for an unaligned offset, nor past the end), and the view gets the right values."""
    pad = 300
    for noise in ("gaussian", "rademacher"):
        for n, offset in SPANS:
            buf = torch.full((pad + n + pad,), 12345.0, dtype=dtype)
            buf[pad:pad + n] = _rand((n,), dtype, seed=n)
            before = buf.clone()
            dev = buf.clone().to(device)
            F.perturb_([dev[pad:pad + n]], 8, 0.5, noise=noise, offsets=[offset], backend=backend)
            dev = dev.cpu()
            assert torch.equal(dev[:pad], before[:pad]), (noise, n, offset)
            assert torch.equal(dev[pad + n:], before[pad + n:]), (noise, n, offset)
            _assert_pass_close(dev[pad:pad + n], before[pad:pad + n], 1.0, 0.5,
                               R.noise(n, 8, 0, noise, offset))


@pytest.mark.parametrize("block", [128, 512, 4096])
def test_kernel_views_leave_neighbours_untouched(triton_device, block):
    """Same as above through the raw launcher with small blocks (many programs; the last one mostly
    masked), with load_x True and False."""
    from fastmezo.kernels import axpbz_ as launch

    pad = 200
    for kind in (0, 1):
        for n, offset in LAUNCHER_SPANS:
            for load_x in (True, False):
                buf = torch.full((pad + n + pad,), -777.0)
                buf[pad:pad + n] = torch.randn(n, generator=_gen(n))
                before = buf.clone()
                dev = buf.clone().to(triton_device)
                launch(dev[pad:pad + n], 1.0, 0.25, 2**63 + 1, 4, kind, offset=offset, block=block, load_x=load_x)
                dev = dev.cpu()
                assert torch.equal(dev[:pad], before[:pad]) and torch.equal(dev[pad + n:], before[pad + n:]), \
                    (kind, n, offset, load_x)


# ------------------------------------------------------------------------------------------------
# Keys
# ------------------------------------------------------------------------------------------------

@all_backends
def test_default_keys_are_positions(backend, device):
    """Several tensors in one call with no keys get keys 0, 1, 2 (in order) - and not all the same
    noise: each tensor's perturbation is alpha times the oracle noise of its own position."""
    shapes = [(64,), (9, 7), (200,)]
    xs = [_rand(s, torch.float32, 20 + i) for i, s in enumerate(shapes)]
    moved = [x.clone().to(device) for x in xs]
    F.perturb_(moved, 42, 0.25, backend=backend)
    for key, (x, got) in enumerate(zip(xs, moved)):
        _assert_pass_close(got.cpu(), x, 1.0, 0.25, _z(x.shape, 42, key))
    # the same tensor alone, as element 1 of a list, is key 1 - not key 0
    alone = xs[1].clone().to(device)
    F.perturb_([alone], 42, 0.25, backend=backend)
    assert not torch.equal(alone.cpu(), moved[1].cpu())


@all_backends
def test_keys_from_names(backend, device):
    """keys='name' with (name, tensor) pairs (or a dict) uses key_from_name: a wrapped name gets the key
    of the plain name, so a DDP/compiled model is perturbed exactly like the bare one."""
    names = ["module.encoder.weight", "_orig_mod.decoder.bias", "head.weight"]
    xs = [_rand((50,), torch.float32, 30), _rand((3, 4), torch.float16, 31), _rand((129,), torch.bfloat16, 32)]
    moved = [x.clone().to(device) for x in xs]
    F.perturb_(list(zip(names, moved)), 7, 0.125, keys="name", backend=backend)
    for name, x, got in zip(names, xs, moved):
        _assert_pass_close(got.cpu(), x, 1.0, 0.125, _z(x.shape, 7, key_from_name(name)))

    bare = [x.clone().to(device) for x in xs]
    F.perturb_(dict(zip(["encoder.weight", "decoder.bias", "head.weight"], bare)), 7, 0.125, keys="name",
               backend=backend)
    for got, ref in zip(bare, moved):
        assert torch.equal(got.cpu(), ref.cpu())

    with pytest.raises(ValueError, match="name"):
        F.perturb_([x.clone().to(device) for x in xs], 7, 0.1, keys="name", backend=backend)


@all_backends
def test_keys_index_means_positions(backend, device):
    """keys='index' (docs/noise.md section 5) gives tensor i key i, like giving no keys."""
    xs = [_rand((40,), torch.float32, 25), _rand((41,), torch.float16, 26)]
    moved = [x.clone().to(device) for x in xs]
    F.perturb_(moved, 5, 0.5, keys="index", backend=backend)
    for key, (x, got) in enumerate(zip(xs, moved)):
        _assert_pass_close(got.cpu(), x, 1.0, 0.5, _z(x.shape, 5, key))


@all_backends
def test_bad_input_raises_and_changes_nothing(backend, device):
    """Every argument is validated before anything runs: a bad tensor, duplicate keys, the same or
    overlapping memory given twice (it would be perturbed twice), a bad seed, alpha, noise or offset
    raise a clear error and leave the valid tensors of the call untouched."""
    good = _rand((100,), torch.float32, 40).to(device)
    before = good.clone()
    cases = [
        (([good, torch.zeros(3, dtype=torch.float64, device=device)], 1, 0.1), {}, TypeError, "dtype"),
        (([good, torch.zeros(4, 4, device=device).t()], 1, 0.1), {}, ValueError, "contiguous"),
        (([good, torch.zeros(4, device=device)], 1, 0.1), {"keys": [3, 3]}, ValueError, "distinct"),
        (([good, good], 1, 0.1), {}, ValueError, "overlap"),
        (([good[:60], good[50:]], 1, 0.1), {}, ValueError, "overlap"),
        (([good], -1, 0.1), {}, ValueError, "seed"),
        (([good], 1.5, 0.1), {}, TypeError, "seed"),
        (([good], 1, float("nan")), {}, ValueError, "finite"),
        (([good], 1, 0.1), {"noise": "uniform"}, ValueError, "noise"),
        (([good], 1, 0.1), {"offsets": [-1]}, ValueError, "offsets"),
    ]
    for args, kwargs, exc, word in cases:
        with pytest.raises(exc, match=word):
            F.perturb_(*args, backend=backend, **kwargs)
        assert torch.equal(good, before), word


# ------------------------------------------------------------------------------------------------
# Backends against each other
# ------------------------------------------------------------------------------------------------

@all_dtypes
@pytest.mark.parametrize("shape", SHAPES[1:], ids=SHAPE_IDS[1:])
def test_triton_matches_reference_backend(triton_device, dtype, shape):
    """Same input, same call on the triton and the reference backend: each within the tolerance of the
    module docstring of the exact value, so within twice that of each other; Rademacher perturbations
    of float32 weights by a power-of-2 alpha are bit-identical (b z = +-alpha exactly, one rounding)."""
    x = _rand(shape, dtype, seed=50)
    z = _z(shape, 2**62 + 7, 3)
    results = {}
    for backend, device in [("triton", triton_device), ("oracle", "cpu")]:
        results[backend] = _run_on(device, x, lambda t: F.perturb_(
            [t], 2**62 + 7, -0.02, keys=[3], backend=backend))
    t, r = results["triton"].double(), results["oracle"].double()
    tol = 2 * (torch.maximum(ulp(results["triton"]), ulp(results["oracle"])).double()
               + 2.0 ** -22 * (x.double().abs() + 0.02 * z.double().abs())
               + 0.02 * NORMAL_ATOL * (1 + z.double().abs()))
    assert bool(((t - r).abs() <= tol).all())

    if dtype == torch.float32:
        for alpha in (2.0 ** -10, -0.5, 1.0):
            tri = _run_on(triton_device, x, lambda v: F.perturb_(v, 77, alpha, noise="rademacher", backend="triton"))
            ref = _run_on("cpu", x, lambda v: F.perturb_(v, 77, alpha, noise="rademacher", backend="oracle"))
            assert torch.equal(tri, ref), alpha
            assert torch.equal(tri, x + alpha * _z(shape, 77, 0, "rademacher"))


# ------------------------------------------------------------------------------------------------
# A MeZO step that changes nothing
# ------------------------------------------------------------------------------------------------

@all_backends
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_null_step_returns_weights(backend, device, noise):
    """MeZO's +eps, -2 eps, then restore with lr = 0 (restore_and_update_) or +eps (perturb_) returns
    float32 weights to within 1.5 ulp of |theta| + 2 eps |z|: three roundings of half an ulp of values
    at most that large. Each pass uses the same z, so no noise tolerance enters, and the products b z
    (b = eps, -2 eps, eps, all exact scalings of one float32) round identically and cancel."""
    theta = torch.randn(4097, generator=_gen(60)) * torch.logspace(-4, 1, 4097)  # magnitudes 1e-4 .. 10
    eps, seed = 1e-3, 2**40 + 1
    z = _z(theta.shape, seed, 0, noise).double()
    bound = 1.5 * ulp((theta.double().abs() + 2 * eps * z.abs()).float()).double()
    for restore in ("restore_and_update_", "perturb_"):
        w = theta.clone().to(device)
        F.perturb_(w, seed, eps, noise=noise, backend=backend)
        moved = not torch.equal(w.cpu(), theta)
        F.perturb_(w, seed, -2 * eps, noise=noise, backend=backend)
        if restore == "restore_and_update_":
            F.restore_and_update_(w, seed, eps, 0.0, 123.0, weight_decay=0.1, noise=noise, backend=backend)
        else:
            F.perturb_(w, seed, eps, noise=noise, backend=backend)
        err = (w.cpu().double() - theta.double()).abs()
        assert moved
        assert bool((err <= bound).all()), (restore, float(err.max()))


# ------------------------------------------------------------------------------------------------
# Rounding to bfloat16
# ------------------------------------------------------------------------------------------------

@all_backends
def test_bf16_rounding_is_to_nearest(backend, device):
    """The pass rounds its float32 result to bfloat16 to nearest: adding |alpha z| < 2**-13 to bfloat16
    weights with |x| >= 0.5 (ulp >= 2**-8) must leave them unchanged. Rounding toward zero would move
    about half of them down by one ulp, a systematic drift over many MeZO steps. (Triton's interpreter
    converts by truncation; the kernels round on the bit pattern there, so it holds on every backend.)"""
    g = _gen(70)
    x = ((0.5 + torch.rand(5000, generator=g)) * torch.sign(torch.randn(5000, generator=g))).to(torch.bfloat16)
    alpha = 2.0 ** -16  # |alpha z| <= 5.8 * 2**-16 < 2**-13
    got = _run_on(device, x, lambda t: F.perturb_(t, 3, alpha, backend=backend))
    assert torch.equal(got, x), f"{int((got != x).sum())} of {x.numel()} weights moved"


# ------------------------------------------------------------------------------------------------
# The Triton table kernel: many tensors in one launch, many blocks per tensor
# ------------------------------------------------------------------------------------------------

def test_table_kernel_many_tensors_mixed_dtypes_and_alignments(triton_device):
    """One call over 37 tensors (Gaussian: the program map; Rademacher: binary search over 2**6 block
    starts) of three dtypes, some at odd storage offsets (unaligned, masked path) and some aligned,
    with small blocks so tensors span many programs: every tensor gets a * x + b * z of its own key, and the padding around the views is
    untouched."""
    from fastmezo.kernels.axpbz import axpbz_multi_

    sizes = [1, 7, 64, 129, 300, 1000, 1027, 2049] * 4 + [3, 5, 8, 9, 4100]
    buffers, views, before = [], [], []
    for i, n in enumerate(sizes):
        dtype = DTYPES[i % 3]
        pad = 0 if i % 2 == 0 else 3          # odd element offset: not 16-byte aligned
        buf = torch.full((pad + n + 5,), 4321.0, dtype=dtype)
        buf[pad:pad + n] = _rand((n,), dtype, seed=100 + i)
        buf = buf.to(triton_device)
        buffers.append((buf, pad, n))
        views.append(buf[pad:pad + n])
        before.append(buf.cpu().clone())
    keys = [7 * i + 1 for i in range(len(sizes))]
    offsets = [0 if i % 3 else 5 * i for i in range(len(sizes))]
    for noise in (0, 1):
        for i, v in enumerate(views):
            v.copy_(before[i][buffers[i][1]:buffers[i][1] + sizes[i]].to(triton_device))
        axpbz_multi_(views, 0.75, -0.5, 99, keys, noise, offsets, block=256)
        for i, (buf, pad, n) in enumerate(buffers):
            got = buf.cpu()
            x = before[i][pad:pad + n]
            z = R.noise(n, 99, keys[i], Noise(noise), offsets[i])
            _assert_pass_close(got[pad:pad + n], x, 0.75, -0.5, z)
            assert torch.equal(got[:pad], before[i][:pad]) and torch.equal(got[pad + n:], before[i][pad + n:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_table_kernel_stochastic_rounding_many_blocks_and_shards(triton_device, dtype):
    """Stochastic rounding over many programs (block 256) stores exactly pass_with_z(x, a, b, z, r)
    with the kernel's own z and the oracle's draws r, and shards at unaligned offsets reproduce the
    whole tensor bit for bit."""
    from fastmezo.kernels.axpbz import axpbz_multi_

    n, rseed = 5003, 12345
    x = _rand((n,), dtype, seed=8).to(triton_device)
    for noise in (0, 1):
        z = torch.empty(n, device=triton_device)
        axpbz_multi_([z], 0.0, 1.0, 77, [9], noise, [0], load_x=False, block=256)
        r = R.rounding_bits_at(torch.arange(n, device=triton_device), rseed, 9)
        want = R.pass_with_z(x, 1.0, 5e-3, z, r)
        whole = x.clone()
        axpbz_multi_([whole], 1.0, 5e-3, 77, [9], noise, [0], round_seed=rseed, block=256)
        assert torch.equal(whole.view(torch.int16), want.view(torch.int16)), noise
        for lo, hi in [(1, 9), (130, 2504), (2504, n)]:
            shard = x[lo:hi].clone()
            axpbz_multi_([shard], 1.0, 5e-3, 77, [9], noise, [lo], round_seed=rseed, block=256)
            assert torch.equal(shard.view(torch.int16), whole[lo:hi].view(torch.int16)), (noise, lo, hi)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_chunked_blocks_store_the_same_bits(triton_device, dtype):
    """A program may compute its block in chunks (the GPU default, for registers): every chunk size
    that divides the block stores the same bits as the unchunked block, for both noises, with and
    without stochastic rounding, with unaligned offsets and several tensors in one launch."""
    from fastmezo.kernels.axpbz import axpbz_multi_

    sizes, offsets, keys = [1000, 2100, 129], [3, 0, 130], [4, 5, 6]
    xs = [_rand((n,), dtype, seed=40 + n).to(triton_device) for n in sizes]
    for noise, chunks in ((0, (1024, 128)), (1, (1024, 128))):
        for rseed in (None, 2**64 - 5):
            runs = []
            for chunk in chunks:
                ys = [x.clone() for x in xs]
                axpbz_multi_(ys, 0.5, 3e-3, 2**40 + 7, keys, noise, offsets, round_seed=rseed, block=1024,
                             chunk=chunk)
                runs.append(ys)
            for ys in runs[1:]:
                for y, want, x in zip(ys, runs[0], xs):
                    assert not torch.equal(want, x), (noise, rseed)        # the pass changed something
                    assert torch.equal(y.view(torch.uint8), want.view(torch.uint8)), (noise, rseed, dtype)
    with pytest.raises(ValueError, match="chunk 100 must divide"):
        axpbz_multi_(xs, 1.0, 1.0, 1, keys, 0, offsets, block=1024, chunk=100)


def test_table_cache_builds_each_table_once_and_holds_a_model_of_modules(triton_device):
    """The launcher's device tables are cached by content: the same tensors again reuse the table (no
    upload: on CUDA an upload per call would cost host time, and from pageable memory a stream sync), a
    changed tensor list builds a new one, a launch from a cached table computes a * x + b * z for every
    tensor, and the cache holds one table per module of a large model (exact mode makes one per hooked
    module), so a second forward finds them all."""
    from fastmezo.kernels import axpbz as K

    sizes = (5, 300, 17)
    xs = [_rand((n,), torch.float32, seed=40 + n).to(triton_device) for n in sizes]
    before = K._tables.misses
    K.axpbz_multi_(xs, 1.0, 0.5, 3, [0, 1, 2], 0)
    after_first = [x.cpu().clone() for x in xs]
    K.axpbz_multi_(xs, 0.5, -0.25, 4, [0, 1, 2], 0)      # other seed and coefficients: same table
    assert K._tables.misses == before + 1
    for x, x1, n, key in zip(xs, after_first, sizes, range(3)):
        _assert_pass_close(x.cpu(), x1, 0.5, -0.25, R.noise(n, 4, key, Noise.GAUSSIAN, 0))
    K.axpbz_multi_(xs[:2], 1.0, 0.5, 3, [0, 1], 0)
    assert K._tables.misses == before + 2
    assert K._tables.capacity >= 2048                    # a 70B model has ~1000 modules with parameters


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pair_pass_stores_the_bits_of_two_passes(triton_device, dtype):
    """The pair pass (paired mode's copies) writes x + b z and, pair_delta elements after each output,
    x - b z: bit for bit the out-of-place passes with b and with -b, for both noises, nearest and
    stochastic rounding, several tensors of one launch (aligned, unaligned, several programs each),
    into poisoned outputs, and nothing outside them."""
    from fastmezo.kernels.axpbz import axpbz_multi_

    sizes, offsets, keys = [1000, 2100, 129, 7], [3, 0, 136, 8], [4, 5, 6, 7]
    xs = [_rand((n,), dtype, seed=60 + n).to(triton_device) for n in sizes]
    for pad in (0, 3):                                          # 3: the outputs are not 16-byte aligned
        starts = [pad + sum(sizes[:i]) + 5 * i for i in range(len(sizes))]
        delta = starts[-1] + sizes[-1] + 11
        for noise in (0, 1):
            for rseed in (None, 2**63 + 9):
                buf = torch.full((2 * delta,), float("nan"), dtype=dtype, device=triton_device)
                plus = [buf[s:s + n] for s, n in zip(starts, sizes)]
                axpbz_multi_(xs, 1.0, 3e-3, 2**40 + 3, keys, noise, offsets, outs=plus, round_seed=rseed,
                             block=1024, pair_delta=delta)
                written = torch.zeros_like(buf, dtype=torch.bool)
                for x, s, n, key, off in zip(xs, starts, sizes, keys, offsets):
                    for sign, at in ((1, s), (-1, s + delta)):
                        want = torch.empty_like(x)
                        axpbz_multi_([x], 1.0, sign * 3e-3, 2**40 + 3, [key], noise, [off], outs=[want],
                                     round_seed=rseed, block=1024)
                        got = buf[at:at + n]
                        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (pad, noise, rseed, sign)
                        written[at:at + n] = True
                    assert not torch.equal(buf[s:s + n], buf[s + delta:s + delta + n])
                assert buf[~written].isnan().all()                 # nothing between the outputs was written
    with pytest.raises(ValueError, match="one dtype"):
        axpbz_multi_(xs[:2], 1.0, 1.0, 1, keys[:2], 0, offsets[:2],
                     outs=[torch.empty_like(xs[0]), torch.empty(sizes[1], dtype=torch.float64, device=triton_device)],
                     pair_delta=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("noise", [0, 1])
def test_rows_pass_is_the_whole_tensors_pass_at_each_row(triton_device, dtype, noise):
    """rows_pass_ (paired mode's embedding lookups): rows gathered from a table, repeats and neighbours
    included, perturbed over their own stretch of the table's stream with offsets given on the device,
    equal the rows of the whole table's pass bit for bit; nothing else is written."""
    from fastmezo.kernels.axpbz import axpbz_multi_, rows_pass_

    width, table_offset = 23, 40                          # odd width: rows start inside a Philox call
    table = _rand((50, width), dtype, seed=9).to(triton_device)
    ids = torch.tensor([3, 4, 5, 49, 3, 0, 17, 17], device=triton_device)
    whole = table.clone()
    axpbz_multi_([whole], 1.0, -4e-3, 2**40 + 1, [12], noise, [table_offset], block=256)
    buf = torch.full((ids.numel() + 2, width), float("nan"), dtype=dtype, device=triton_device)
    rows = buf[1:-1]
    rows.copy_(table[ids])
    rows_pass_(rows, -4e-3, 2**40 + 1, 12, table_offset + ids * width, noise, block=256)
    assert torch.equal(rows.view(torch.uint8), whole[ids].view(torch.uint8))
    assert buf[0].isnan().all() and buf[-1].isnan().all()
