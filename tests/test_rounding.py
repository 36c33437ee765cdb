"""Stochastic rounding (docs/noise.md section 8) and the out-of-place pass, on every backend that runs here
(conftest.backend_devices(): reference, triton (compiled on a GPU, interpreted on the CPU), native CPU /
CUDA), against the torch oracle fastmezo.oracle.

What must hold, and how it is checked:
  * The 16-bit draws of a backend are the oracle's (rounding_bits_at), bit for bit: recovered from the
    backend's own stored results by a binary search (16 passes; each pass stores, per element, whether
    r >= T for a threshold T set through the element's own b).
  * Stored values: bit-identical to oracle.pass_with_z(x, a, b, z_backend, r), with z_backend the
    backend's own z (make_noise), so the contract's last-bit freedom of Gaussian z does not matter. The
    float32 y must then be the oracle's too, except where a backend fuses a * x + b * z into an FMA
    (compiled Triton, docs/noise.md section 3): there results may differ by one ulp of the dtype, on at
    most 1% of the elements.
  * Unbiased: the mean of n stochastic roundings of one value is within 5 sigma of it
    (sigma = ulp * sqrt(p (1 - p) / n), plus the contract's 2^-16 ulp bias bound).
  * Deterministic for a seed, different seeds differ; float32 is stored exactly as without rounding.
  * Out of place: NaN-poisoned outputs fully written, the input unchanged bit for bit, equal to the in-place
    result. Shards (offsets) get the draws of the unsharded tensor.
  * MeZO(stochastic_rounding=True) on bfloat16 follows the oracle step (three passes with
    rounding_seed(step_seed, 0 / 1 / 2)) bit for bit on the reference and native backends (same z and same
    float32 arithmetic), within 1 bf16 ulp elsewhere; and an update far below one ulp moves the weights by
    the right amount on average, while round-to-nearest drops it.
Sizes are small for the Triton interpreter (it runs each program instance in Python).
"""
import math

import numpy as np
import pytest
import torch

import fastmezo
from fastmezo import functional as F
from fastmezo import oracle as R
from fastmezo.noise import derive_seed, rounding_seed

from conftest import backend_devices, ulp

PAIRS = backend_devices()
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]
SEED = 0xF00DFACE12345678
ROUND_SEED = 0x8000000000000001  # top bit set: carried as a negative int64 by the schemas


def _interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _size(backend, device, interpreted, reference, fast):
    """A test size per backend: the Triton interpreter runs program instances in Python and the reference
    computes Philox in int64 torch ops; the native and compiled backends take the large size."""
    if _interpreted(backend, device):
        return interpreted
    return reference if backend == "oracle" else fast


def _fma_possible(backend, device):
    """Compiled Triton may contract a * x + b * z into an FMA (docs/noise.md section 3)."""
    return backend == "triton" and device != "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(n, dtype, seed, device):
    return torch.randn(n, generator=_gen(seed)).to(dtype).to(device)


def _index(offset, n, device="cpu"):
    return torch.arange(offset, offset + n, dtype=torch.int64, device=device)


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _assert_same_bits(got, want, backend, device, what=""):
    """Bit-identical; where the backend may fuse an FMA, within one ulp of the dtype on <= 1% of elements."""
    got, want = got.cpu(), want.cpu()
    same = _bits(got) == _bits(want)
    if bool(same.all()):
        return
    assert _fma_possible(backend, device), f"{what}: {int((~same).sum())} of {got.numel()} stored values differ"
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= ulp(want).double()).all()), f"{what}: off by more than one ulp"
    assert int((~same).sum()) <= max(1, got.numel() // 100), f"{what}: {int((~same).sum())} elements differ"


# ------------------------------------------------------------------------------------------------
# The draws
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rounding_draws_identical_to_oracle(backend, device, dtype):
    """Each element gets its own 1-element tensor (key, offset), filled with y = b z (a = 0, Rademacher:
    z = +-1, so |y| = b). With |y| = base * (1 + (2^16 - T) / 2^16) between two adjacent values base and
    base + ulp, the element is stored away from zero iff r >= T: 16 passes of a binary search give r."""
    # (key, global index): the first call's lanes, odd lanes, the counter's high word, a large key.
    elements = [(7, 0), (7, 1), (7, 2), (7, 7), (3, 9), (11, 2**32 - 1), (12, 2**32), (13, 2**40 + 3),
                (0xFFFFFFFF, 12345)]
    if _interpreted(backend, device):
        elements = [elements[0], elements[5], elements[7]]  # distinct keys: one call per round
    # bf16 around 1 (ulp 2^-7); fp16 in the subnormals [2^-24, 2^-23) (ulp 2^-24): y exact in float32.
    base = 1.0 if dtype == torch.bfloat16 else 2.0 ** -24
    ulp_ = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -24
    keys = [k for k, _ in elements]
    offsets = [o for _, o in elements]
    lo = [0] * len(elements)
    hi = [65536] * len(elements)
    for _ in range(16):
        mids = [(l + h) // 2 for l, h in zip(lo, hi)]
        b = [base + (65536 - m) * ulp_ / 65536 for m in mids]
        tensors = [torch.full((1,), 3.0, dtype=dtype, device=device) for _ in elements]
        # One call per group of distinct keys (a call's tensors must have distinct keys).
        groups = {}
        for i, k in enumerate(keys):
            groups.setdefault(sum(1 for kk in keys[:i] if kk == k), []).append(i)
        for idx in groups.values():
            F.scale_and_add_noise_([tensors[i] for i in idx], 0.0, [b[i] for i in idx], SEED, keys=[keys[i] for i in idx],
                     noise="rademacher", offsets=[offsets[i] for i in idx], rounding_seed=ROUND_SEED, backend=backend)
        for i, t in enumerate(tensors):
            up = abs(float(t.item())) > base
            lo[i], hi[i] = (mids[i], hi[i]) if up else (lo[i], mids[i])
    want = [int(R.rounding_bits_at(torch.tensor([o]), ROUND_SEED, k)) for k, o in elements]
    assert lo == want


def test_fixed_draws_of_the_contract():
    """docs/noise.md section 7: rounding seeds of a step's passes and draws of a documented index."""
    seed = 0x0123456789ABCDEF
    assert [rounding_seed(seed, p) for p in range(3)] == [0x5F6468E346C5FD35, 0xAC58CDE726DB1478, 0x6BD190155B7B3816]
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2**32, 2**32 + 1, 2**40 + 3])
    assert R.rounding_bits_at(idx, seed, 7).tolist() == [0xFCC7, 0x6AFB, 0xB5E9, 0x6B80, 0xB903, 0x80CC, 0x0327,
                                                         0x7519, 0x0071, 0xFB8C, 0x43D2]
    y = torch.tensor([1 + 2**-9, 1 + 2**-9, 2**-26, 2**-26, 1e6])
    r = torch.tensor([49151, 49152, 49151, 49152, 65535])
    assert R.round_stochastic(y[:2], r[:2], torch.bfloat16).tolist() == [1.0, 1.0078125]
    assert R.round_stochastic(y[2:], r[2:], torch.float16).tolist() == [0.0, 2**-24, 65504.0]


# ------------------------------------------------------------------------------------------------
# Stored values
# ------------------------------------------------------------------------------------------------

def _sizes(backend, device):
    # 3 * 4096 + 5 on the compiled backends: full blocks take the Triton kernel's unmasked vector path.
    return _size(backend, device, [1, 7, 129], [1, 7, 1027], [1, 7, 1027, 33 * 65, 3 * 4096 + 5])


def _assert_pass_like_oracle(x, offset, key, a, b, noise, backend, device):
    """One stochastically rounded pass over a copy of x stores pass_with_z(x, a, b, z_backend, r_oracle)."""
    n = x.numel()
    z = F.make_noise(n, SEED, key, noise=noise, offset=offset, device=device, backend=backend)
    r = R.rounding_bits_at(_index(offset, n, device), ROUND_SEED, key)
    want = R.pass_with_z(x, a, b, z, r)
    got = x.clone()
    F.scale_and_add_noise_([got], a, b, SEED, keys=[key], noise=noise, offsets=[offset], rounding_seed=ROUND_SEED,
                           backend=backend)
    _assert_same_bits(got, want, backend, device, f"n={n} offset={offset} a={a} b={b}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_stored_values_bit_identical_to_oracle(backend, device, dtype, noise):
    """In place: stored == pass_with_z(x, a, b, z_backend, r_oracle), odd sizes and offsets (unaligned,
    past 2^32); values of mixed magnitudes (the update moves some by less than an ulp, some by more)."""
    for n in _sizes(backend, device):
        for offset, key, a, b in [(0, 0, 1.0, 1e-3), (5, 9, 0.9993, -0.37), (2**32 - 3, 0xFFFFFFFF, -1.5, 2.5)]:
            x = _rand(n, dtype, seed=n + key, device=device)
            _assert_pass_like_oracle(x, offset, key, a, b, noise, backend, device)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_float16_subnormal_results_bit_identical_to_oracle(backend, device, noise):
    """Results in float16's subnormal range (|y| < 2**-14, where every backend has its own formula for the
    decision, e.g. directed-rounding float32 steps in compiled Triton) with fractions of every size:
    x float16 subnormals, y = x + b z (a = 1) and y = a x + b z, stored bits equal the oracle's."""
    n = _size(backend, device, [700], [4099], [3 * 4096 + 5, 1 << 16])[-1]
    gen = _gen(n)
    x = (torch.randint(-1023, 1024, (n,), generator=gen).float() * 2.0 ** -24).to(torch.float16).to(device)
    for offset, key, a, b in [(0, 3, 1.0, 2.0 ** -21 * 1.337), (9, 5, 0.999, -3e-7), (2**33 + 1, 11, 1.0, 1e-9)]:
        _assert_pass_like_oracle(x, offset, key, a, b, noise, backend, device)


def test_directed_rounding_formula_of_float16_subnormals():
    """The float32 steps of kernels.philox._float16_subnormal's compiled form (round toward zero, which
    the CPU has no operation for: emulated in float64, exact for these positive operands) against the
    oracle, on fractions at the decision's edge (q + r within 2**-30 of 2**16 - 2**-9), random ones,
    float32 subnormals and the float32 sum's q = 1000.999 case."""
    def rz(v):                      # float64 -> float32 toward zero
        f = v.astype(np.float32)
        over = f.astype(np.float64) > v
        f[over] = np.nextafter(f[over], np.float32(0))
        return f

    rng = np.random.default_rng(0)
    n = 1 << 18
    r = rng.integers(0, 65536, n)
    edge = 1 - (r + 2.0 ** -9) / 65536 + rng.choice([-1, 0, 1], n) * np.exp2(-rng.integers(20, 31, n))
    frac = np.where(rng.random(n) < 0.5, edge, rng.random(n)).clip(0, 1 - 2.0 ** -30)
    y = ((rng.integers(0, 1024, n) + frac) * 2.0 ** -24).astype(np.float32)
    tiny = (rng.random(n) * np.exp2(-rng.integers(24, 150, n))).astype(np.float32)
    y = np.where(rng.random(n) < 0.2, tiny, y)
    y = np.where(y >= 2.0 ** -14, np.float32(2.0 ** -15), y)
    y = np.concatenate([y, np.full(4096, np.float32(1000.999) * np.float32(2.0 ** -40))])
    r = np.concatenate([r, np.arange(65536 - 4096, 65536)])
    w = rz(y.astype(np.float64) * 2.0 ** 40 + 2.0 ** -9)
    x = rz(w.astype(np.float64) + (r.astype(np.uint32) | np.uint32(0x4B000000)).view(np.float32))
    m = rz(x.astype(np.float64) + 2.0 ** 39)
    got = m.view(np.uint32).astype(np.int64) - (0x53000000 + 128)
    want = R.round_stochastic(torch.from_numpy(y), torch.from_numpy(r), torch.float16).view(torch.int16).numpy()
    assert np.array_equal(got, want.astype(np.int64)), f"{int((got != want).sum())} of {y.size} differ"


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_special_values_round_like_the_oracle(backend, device):
    """Zeros, float16 subnormals, y beyond the largest finite value (saturates, never inf), inf and NaN
    (round to nearest): x holds them (in the dtype), y = a * x + 1e-30 * z, stored as the oracle stores it."""
    x32 = torch.tensor([0.0, -0.0, 6e-8, -6e-8, 2.0**-26, 1e-9, 65504.0, 70000.0, -1e6, 3.0e38,
                        float("inf"), float("-inf"), float("nan"), 1.0, -1.0, 0.33])
    n = x32.numel()
    z = F.make_noise(n, SEED, 4, noise="rademacher", device=device, backend=backend)
    r = R.rounding_bits_at(_index(0, n, device), ROUND_SEED, 4)
    for dtype in DTYPES:
        xd = x32.to(dtype).to(device)
        for a in (1.0, 1e-3, 7.7):
            want = R.pass_with_z(xd, a, 1e-30, z, r)
            got = xd.clone()
            F.scale_and_add_noise_([got], a, 1e-30, SEED, keys=[4], noise="rademacher", rounding_seed=ROUND_SEED, backend=backend)
            got_c, want_c = got.cpu(), want.cpu()
            nan = torch.isnan(want_c)
            assert torch.equal(torch.isnan(got_c), nan), (dtype, a)
            _assert_same_bits(got_c[~nan], want_c[~nan], backend, device, f"{dtype} a={a}")
            finite_y = torch.isfinite(xd.cpu().float() * a)
            assert not bool(torch.isinf(got_c[finite_y]).any())  # saturates at the largest finite value


# ------------------------------------------------------------------------------------------------
# Statistics, determinism, float32
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_unbiased(backend, device, dtype):
    """n elements all get |y| = v (a = 0, b = v, Rademacher z = +-1), v between two adjacent values of the
    dtype at p = 0.3 of the way: the mean of the stored |values| is v within 5 sigma + 2^-16 ulp."""
    n = _size(backend, device, 4096, 1 << 14, 1 << 17)
    lo_v = 1.0
    u = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # the ulp above 1
    v = lo_v + 0.3 * u
    x = _rand(n, dtype, seed=3, device=device)
    F.scale_and_add_noise_([x], 0.0, v, SEED, keys=[2], noise="rademacher", rounding_seed=ROUND_SEED, backend=backend)
    got = x.cpu().double().abs()
    assert bool(((got == lo_v) | (got == lo_v + u)).all())  # only the two neighbours
    v32 = float(torch.tensor(v, dtype=torch.float32))
    p = (v32 - lo_v) / u
    sigma = u * math.sqrt(p * (1 - p) / n)
    assert abs(float(got.mean()) - v32) <= 5 * sigma + u * 2.0 ** -16, (float(got.mean()), v32, sigma)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_deterministic_and_seed_dependent(backend, device):
    n = _size(backend, device, 257, 4000, 10_000)
    x = _rand(n, torch.bfloat16, seed=4, device=device)
    runs = {}
    for name, rs in [("a", ROUND_SEED), ("a again", ROUND_SEED), ("b", ROUND_SEED + 1), ("nearest", None)]:
        y = x.clone()
        F.perturb_([y], SEED, 3e-3, noise="rademacher", rounding_seed=rs, backend=backend)
        runs[name] = y.cpu()
    assert torch.equal(runs["a"], runs["a again"])
    differ = int((runs["a"] != runs["b"]).sum())
    assert differ > n // 20, differ  # ~0.4 ulp moves: a good share of elements round differently
    assert int((runs["a"] != runs["nearest"]).sum()) > n // 20


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_float32_unaffected(backend, device):
    """float32 results are stored exactly as without rounding (in place and out of place)."""
    n = 129 if _interpreted(backend, device) else 4099
    x = _rand(n, torch.float32, seed=5, device=device)
    for noise in ("gaussian", "rademacher"):
        plain, sr = x.clone(), x.clone()
        F.perturb_([plain], SEED, 0.01, noise=noise, backend=backend)
        F.perturb_([sr], SEED, 0.01, noise=noise, rounding_seed=ROUND_SEED, backend=backend)
        assert torch.equal(plain, sr)
        out = F.perturbed(x, SEED, 0.01, noise=noise, rounding_seed=ROUND_SEED, backend=backend)
        assert torch.equal(out, plain)


# ------------------------------------------------------------------------------------------------
# Out of place, empty tensors, shards
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rounding", [None, ROUND_SEED], ids=["nearest", "stochastic"])
def test_out_of_place_equals_in_place(backend, device, rounding):
    """All dtypes and several tensors in one call (one of them empty): outs pre-filled with NaN are fully
    written, the inputs are unchanged bit for bit, and the outputs equal the in-place results."""
    sizes = [5, 0, 129, 3] if _interpreted(backend, device) else [5, 0, 4097, 33 * 65]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]
    xs = [_rand(n, dt, seed=10 + i, device=device) for i, (n, dt) in enumerate(zip(sizes, dtypes))]
    before = [x.clone() for x in xs]
    for noise in ("gaussian", "rademacher"):
        outs = [torch.full_like(x, float("nan")) for x in xs]
        F.perturbed(xs, SEED, 0.02, out=outs, noise=noise, offsets=[0, 0, 3, 2**32 + 1], rounding_seed=rounding,
                    backend=backend)
        inplace = [x.clone() for x in xs]
        F.perturb_(inplace, SEED, 0.02, noise=noise, offsets=[0, 0, 3, 2**32 + 1], rounding_seed=rounding,
                   backend=backend)
        for x, b, o, ip in zip(xs, before, outs, inplace):
            assert torch.equal(_bits(x), _bits(b))  # only read
            assert not bool(torch.isnan(o).any())
            assert torch.equal(_bits(o), _bits(ip))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_empty_tensors(backend, device):
    """An empty tensor beside another: accepted, and it keeps its key, so the tensor after it still gets
    key 1's z and draws (stored as pass_with_z with the backend's own z); perturbed() returns an empty
    tensor of its dtype for it."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        e = torch.empty(0, dtype=dtype, device=device)
        x = _rand(64, dtype, 4, device)
        x0 = x.clone()
        F.perturb_([e, x], SEED, 0.1, rounding_seed=ROUND_SEED, backend=backend)
        z = F.make_noise(64, SEED, 1, device=device, backend=backend)
        r = R.rounding_bits_at(_index(0, 64, device), ROUND_SEED, 1)
        _assert_same_bits(x, R.pass_with_z(x0, 1.0, 0.1, z, r), backend, device, f"in place, {dtype}")
        out = F.perturbed([e, x0], SEED, 0.1, rounding_seed=ROUND_SEED, backend=backend)
        assert out[0].shape == (0,) and out[0].dtype == dtype and out[0].device == e.device
        _assert_same_bits(out[1], x, backend, device, f"out of place, {dtype}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_shards_get_the_draws_of_the_whole(backend, device):
    """Shards of one tensor (same key, offset = where each starts), rounded one by one, give exactly the
    bits of the unsharded tensor: draws depend on the global index only."""
    n = _size(backend, device, 300, 5003, 70_003)
    cuts = [0, 1, 9, 130, n // 2 + 3, n]
    for dtype in DTYPES:
        x = _rand(n, dtype, seed=6, device=device)
        whole = x.clone()
        F.perturb_([whole], SEED, 5e-3, keys=[9], rounding_seed=ROUND_SEED, backend=backend)
        for lo, hi in zip(cuts, cuts[1:]):
            shard = x[lo:hi].clone()
            F.perturb_([shard], SEED, 5e-3, keys=[9], offsets=[lo], rounding_seed=ROUND_SEED, backend=backend)
            assert torch.equal(_bits(shard), _bits(whole[lo:hi])), (dtype, lo, hi)


# ------------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------------

def _params(device, n_small):
    g = _gen(3)
    shapes = [(16, 8), (16,), (4, 16), (4,)] if n_small else [(64, 32), (64,), (8, 64), (8,)]
    return [(torch.randn(s, generator=g) * 0.4).to(torch.bfloat16).to(device) for s in shapes]


def _loss(params, X, Y):
    w1, b1, w2, b2 = (p.float() for p in params)
    return ((torch.tanh(X @ w1.T + b1) @ w2.T + b2 - Y) ** 2).mean()


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_mezo_stochastic_rounding_follows_the_oracle_step(backend, device):
    """Two steps of MeZO(stochastic_rounding=True, Gaussian) on bf16 params against the step computed by
    hand: pass k of step t stores pass_with_z(theta, a, b, z_backend, r_k) with
    r_k = rounding_bits_at(index, rounding_seed(derive_seed(S, t), k), key) for k = 0 (+eps), 1 (-2 eps),
    2 (restore + update). Bit for bit on the reference and native backends; within 1 bf16 ulp elsewhere."""
    small = _interpreted(backend, device)
    X = torch.randn(32, 8 if small else 32, generator=_gen(1)).to(device)
    Y = torch.randn(32, 4 if small else 8, generator=_gen(2)).to(device)
    lr, eps, wd, base = 0.05, 1e-2, 0.01, 99
    params = _params(device, small)
    opt = fastmezo.MeZO(params, lr=lr, eps=eps, weight_decay=wd, seed=base, stochastic_rounding=True, backend=backend)
    mine = [p.clone() for p in params]
    for t in range(1 if small else 2):
        opt.step(lambda: _loss(params, X, Y))
        seed = derive_seed(base, t)
        zs = [F.make_noise(p.numel(), seed, i, device=device, backend=backend).view(p.shape) for i, p in enumerate(mine)]

        def pass_(a, b, k):
            rs = rounding_seed(seed, k)
            for i, (p, z) in enumerate(zip(mine, zs)):
                r = R.rounding_bits_at(_index(0, p.numel(), device), rs, i).view(p.shape)
                p.copy_(R.pass_with_z(p, a, b, z, r))

        pass_(1.0, eps, 0)
        l_plus = float(_loss(mine, X, Y))
        pass_(1.0, -2 * eps, 1)
        l_minus = float(_loss(mine, X, Y))
        g = (l_plus - l_minus) / (2 * eps)
        a = 1.0 - lr * wd
        pass_(a, a * eps - lr * g, 2)
        exact = backend in ("oracle", "native")
        if exact:
            assert opt.projected_grad == g
        for p, q in zip(params, mine):
            if exact:
                assert torch.equal(_bits(p), _bits(q)), t
            else:
                assert bool(((p.double() - q.double()).abs() <= ulp(q).double()).all()), t


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_accumulate_rounds_each_micro_batch_with_its_own_passes(backend, device):
    """MeZO.accumulate: micro-batch j rounds its +eps pass with the bits of pass index 3j (then 3j + 1,
    3j + 2; docs/noise.md section 8). Checked on the bf16 weights the closure sees at +eps, against the
    oracle pass from the weights the micro-batch started from (the previous restore rounds too)."""
    X, Y = torch.randn(32, 8, generator=_gen(1)).to(device), torch.randn(32, 4, generator=_gen(2)).to(device)
    params = _params(device, True)
    opt = fastmezo.MeZO(params, lr=0.05, eps=1e-2, seed=99, stochastic_rounding=True, backend=backend)
    seed = derive_seed(99, 0)
    zs = [F.make_noise(p.numel(), seed, i, device=device, backend=backend).view(p.shape) for i, p in enumerate(params)]
    for j in range(3):
        start = [p.clone() for p in params]
        seen = []
        opt.accumulate(lambda: seen.append([p.clone() for p in params]) or _loss(params, X, Y))
        rs = rounding_seed(seed, 3 * j)
        for i, (got, s, z) in enumerate(zip(seen[0], start, zs)):
            r = R.rounding_bits_at(_index(0, s.numel(), device), rs, i).view(s.shape)
            _assert_same_bits(got, R.pass_with_z(s, 1.0, 1e-2, z, r), backend, device, f"micro-batch {j}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_mezo_sub_ulp_update_moves_weights_only_with_stochastic_rounding(backend, device):
    """bf16 weights at 1.0 (ulp 2^-7 above, 2^-8 below), eps = 1e-4 and lr * g = 1.5e-3 or 5e-4: every pass
    moves y by less than half an ulp. Round to nearest: the weights never move. Stochastic rounding: the
    mean of (theta_new - 1) * z over the elements is -lr * g, within 5 sigma (sigma from the per-element
    rounding noise of the three passes, bounded by ulp / 2 each)."""
    n = _size(backend, device, 1 << 14, 1 << 15, 1 << 18)
    lr, eps = 1e-3, 1e-4
    g = 0.5 if n >= 1 << 18 else 1.5  # |eps - lr g| < 2^-9: round to nearest drops every pass
    nearest_moved = None
    for sr in (True, False):
        w = torch.ones(n, dtype=torch.bfloat16, device=device)
        opt = fastmezo.MeZO([w], lr=lr, eps=eps, seed=7, noise="rademacher", stochastic_rounding=sr, backend=backend)
        losses = iter([1.0 + g * eps, 1.0 - g * eps])  # l_plus - l_minus = 2 eps g
        opt.step(lambda: next(losses))
        assert opt.projected_grad == pytest.approx(g, rel=1e-9)
        if not sr:
            nearest_moved = int((w != 1).sum())
            continue
        z = F.make_noise(n, opt.last_seed, 0, noise="rademacher", device=device, backend=backend)
        moved = ((w.double() - 1.0) * z.double()).cpu()
        sigma = math.sqrt(3) * (2.0 ** -7 / 2) / math.sqrt(n)
        assert abs(float(moved.mean()) + lr * g) <= 5 * sigma, (float(moved.mean()), -lr * g, sigma)
        assert int((w != 1).sum()) > 0
    assert nearest_moved == 0, f"round to nearest moved {nearest_moved} of {n} weights by a sub-half-ulp update"
