"""The noise contract (docs/noise.md, version 1): Philox4x32-10, the counter layout, the uniform and
the two distributions, seed derivation and name keys.

What is checked, and against what:
  * the three Philox implementations (pure Python, torch tensor, Triton device function) against the
    Random123 known-answer vectors, and against each other on random counters and keys;
  * the torch oracle (fastmezo.oracle) against the contract spelled out in plain Python;
  * the Triton kernels against the oracle: Rademacher signs (a pure function of the Philox bits)
    bit for bit, Gaussian normals within NORMAL_ATOL * (1 + |z|) (docs/noise.md);
  * 64-bit element indices, shards and block sizes;
  * statistics of z with bounds stated in standard errors of the sample size used;
  * derive_seed and key_from_name.

Statistical tests draw z from fixed seeds, so they are deterministic. Their bounds are 5 standard
errors (6 for chi-square statistics, whose tails are heavier), so a correct generator would fail any of
them for about one choice of seeds in ten thousand, while an implementation error (a lane read from
the wrong word, a constant bit, a stream or key that does not enter the hash, ...) moves the statistic
by far more than that.
"""
import math
import zlib

import numpy as np
import pytest
import torch

from conftest import HAS_CUDA, HAS_TRITON, NORMAL_ATOL, backend_devices, ulp

from fastmezo import functional as F
from fastmezo import noise as N
from fastmezo import oracle as R
from fastmezo.noise import derive_seed, key_from_name

if HAS_TRITON:
    import triton
    import triton.language as tl

    from fastmezo.kernels import axpbz_ as launch_axpbz
    from fastmezo.kernels.philox import philox4x32_10
    from fastmezo.kernels.philox import _minus_2_log
    from fastmezo.kernels.philox import uniform_from_bits as tl_uniform_from_bits

    @triton.jit
    def _radius_probe_kernel(out_ptr, FAST: tl.constexpr, BLOCK: tl.constexpr):
        """out[k] = sqrt(-2 ln u) for the uniform of every word whose top 23 bits are k (all 2**23)."""
        k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = tl_uniform_from_bits((k << 9).to(tl.uint32))
        tl.store(out_ptr + k, tl.sqrt(_minus_2_log(u, FAST)))

    @triton.jit
    def _philox_probe_kernel(ctr_ptr, key_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[i, :] = philox4x32_10(ctr[i, :], key[i, :]); words travel as int64 holding uint32."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        c0 = tl.load(ctr_ptr + 4 * i + 0, mask=m, other=0).to(tl.uint32)
        c1 = tl.load(ctr_ptr + 4 * i + 1, mask=m, other=0).to(tl.uint32)
        c2 = tl.load(ctr_ptr + 4 * i + 2, mask=m, other=0).to(tl.uint32)
        c3 = tl.load(ctr_ptr + 4 * i + 3, mask=m, other=0).to(tl.uint32)
        k0 = tl.load(key_ptr + 2 * i + 0, mask=m, other=0).to(tl.uint32)
        k1 = tl.load(key_ptr + 2 * i + 1, mask=m, other=0).to(tl.uint32)
        x0, x1, x2, x3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr + 4 * i + 0, x0.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64), mask=m)
        tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64), mask=m)

    @triton.jit
    def _uniform_probe_kernel(bits_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out[i] = uniform_from_bits(bits[i]) (float32), bits given as int64 holding uint32."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        x = tl.load(bits_ptr + i, mask=m, other=0).to(tl.uint32)
        tl.store(out_ptr + i, tl_uniform_from_bits(x), mask=m)


MASK32 = 0xFFFFFFFF
BACKENDS = backend_devices()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KAT_IDS = ["zeros", "ones", "pi"]

# Sample size of the statistical tests: a multiple of 4 and of 128 (whole Philox calls), small enough
# for the Triton interpreter (one program of the default interpreter block), and below torch's
# 32768-element grain size, so the oracle's many elementwise ops run on one thread (on a busy 2-core
# machine, forking each small op over two threads made these tests ten times slower).
N_STAT = 255 * 128  # 32640
SE = 1.0 / math.sqrt(N_STAT)  # standard error of a mean of unit-variance values, and of a correlation


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_words(shape, seed: int) -> torch.Tensor:
    """Uniform uint32 values held in int64."""
    return torch.randint(0, 1 << 32, shape, generator=_gen(seed), dtype=torch.int64)


def _noise(backend, device, numel, seed, key=0, kind="gaussian", offset=0):
    """z from the public make_noise of one backend, as a float64 CPU tensor."""
    return F.make_noise(numel, seed, key, noise=kind, offset=offset, device=device,
                        backend=backend).double().cpu()


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally long vectors (float64)."""
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------------------------
# Philox4x32-10: known answers and agreement of the three implementations
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS, ids=KAT_IDS)
def test_python_philox_known_answers(counter, key, expected):
    """fastmezo.noise.philox4x32 reproduces Random123's philox4x32_10 known-answer vectors exactly."""
    assert N.philox4x32(counter, key) == expected


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS, ids=KAT_IDS)
def test_tensor_philox_known_answers(counter, key, expected):
    """fastmezo.oracle.philox4x32 (int64 tensors holding uint32) reproduces the same vectors exactly,
    also when the counter words are broadcast over a batch."""
    words = R.philox4x32(torch.tensor([counter[0]] * 2), *counter[1:], *key)  # ints broadcast
    for w, e in zip(words, expected):
        assert w.dtype == torch.int64
        assert w.tolist() == [e, e]


def _triton_philox(counters: torch.Tensor, keys: torch.Tensor, device) -> torch.Tensor:
    """Run the device function philox4x32_10 over rows of counters [n, 4] and keys [n, 2]."""
    n = counters.shape[0]
    out = torch.full((n, 4), -1, dtype=torch.int64, device=device)
    block = 1024
    _philox_probe_kernel[(triton.cdiv(n, block),)](counters.to(device).contiguous(),
                                                   keys.to(device).contiguous(), out, n, BLOCK=block)
    return out.cpu()


def test_triton_philox_known_answers(triton_device):
    """The Triton device function kernels.philox.philox4x32_10 gives the Random123 words bit for bit."""
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS], dtype=torch.int64)
    keys = torch.tensor([k for _, k, _ in KNOWN_ANSWERS], dtype=torch.int64)
    out = _triton_philox(counters, keys, triton_device)
    assert out.tolist() == [list(e) for _, _, e in KNOWN_ANSWERS]


def test_python_and_tensor_philox_agree_on_random_inputs():
    """The pure-Python and the tensor Philox agree word for word on 2000 random counters under 20
    random keys (the tensor version's 16-bit split multiplication must be exact for every input)."""
    keys = _random_words((20, 2), seed=1)
    counters = _random_words((20, 100, 4), seed=2)
    for (k0, k1), ctr in zip(keys.tolist(), counters):
        got = torch.stack(R.philox4x32(ctr[:, 0], ctr[:, 1], ctr[:, 2], ctr[:, 3], k0, k1), dim=1)
        expected = [list(N.philox4x32(c, (k0, k1))) for c in ctr.tolist()]
        assert got.tolist() == expected


def test_triton_philox_agrees_with_python_on_random_inputs(triton_device):
    """The Triton Philox agrees with the pure-Python one on 3000 random (counter, key) pairs, keys
    varying per row, including all-ones and zero words."""
    counters = _random_words((3000, 4), seed=3)
    keys = _random_words((3000, 2), seed=4)
    counters[:10] = MASK32
    keys[10:20] = 0
    out = _triton_philox(counters, keys, triton_device)
    expected = [list(N.philox4x32(c, k)) for c, k in zip(counters.tolist(), keys.tolist())]
    assert out.tolist() == expected


def test_triton_uniform_matches_oracle_bit_for_bit(triton_device):
    """kernels.philox.uniform_from_bits equals oracle.uniform_from_bits exactly (both are exact
    float32 arithmetic), at the extreme words 0 and 2**32-1 and on random words; u is in (0, 1) with
    u(0) = 2**-24 and u(2**32-1) = 1 - 2**-24, so ln(u) is always finite."""
    bits = torch.cat([torch.tensor([0, 1, 511, 512, MASK32 - 511, MASK32]), _random_words((5000,), seed=5)])
    ref = R.uniform_from_bits(bits)
    assert ref[0].item() == 2.0 ** -24 and ref[-1 - 5000].item() == 1.0 - 2.0 ** -24
    assert bool((ref > 0).all()) and bool((ref < 1).all())
    out = torch.full((bits.numel(),), float("nan"), device=triton_device)
    _uniform_probe_kernel[(triton.cdiv(bits.numel(), 1024),)](bits.to(triton_device), out, bits.numel(),
                                                              BLOCK=1024)
    assert torch.equal(out.cpu(), ref)


def radius_errors(device, fast: bool):
    """(max |r - r64|, max |r - r64| / (1 + r64), the uniform where the latter peaks) of the Box-Muller
    radius r = sqrt(-2 ln u) of the kernels, over all 2**23 uniforms, against float64."""
    n = 1 << 23
    out = torch.full((n,), float("nan"), device=device)
    _radius_probe_kernel[(n // 4096,)](out, FAST=fast, BLOCK=4096)
    u = (torch.arange(n, dtype=torch.float64) * 2 + 1) * 2.0 ** -24
    r64 = torch.sqrt(-2 * torch.log(u))
    err = (out.cpu().double() - r64).abs()
    scaled = err / (1 + r64)
    worst = int(scaled.argmax())
    return err.max().item(), scaled.max().item(), u[worst].item()


@pytest.mark.skipif(not HAS_CUDA, reason="the FAST log (hardware lg2 + series near u = 1) is compiled CUDA only")
def test_fast_radius_exhaustive_cuda(triton_device):
    """The compiled kernels' radius (hardware log2 away from u = 1, a series near it) is within 2e-6 of
    float64 for every possible uniform, including the 1024 * 2**13 nearest 1, where an approximate
    log alone is off by a large fraction of a small r; the fast sin/cos adds up to 4e-6 * r, within
    the contract's NORMAL_ATOL * (1 + |z|)."""
    max_abs, max_scaled, worst = radius_errors(triton_device, fast=True)
    assert max_scaled <= 2e-6, f"radius error {max_scaled:.3g} * (1 + r) at u = {worst!r} (max abs {max_abs:.3g})"
    assert 2e-6 + 4e-6 <= NORMAL_ATOL


# docs/noise.md section 7: fixed values for seed 0x0123456789ABCDEF, key 7.
FIXED_SEED, FIXED_KEY = 0x0123456789ABCDEF, 7
FIXED_WORDS_CALL0 = (0x34B23A77, 0x8EC43D26, 0xFDBF9305, 0xA6C02CF2)
FIXED_GAUSSIAN = {0: 1.6624960, 1: 0.6303767, 2: 0.0772026, 3: 0.1082067, 4: -0.1629310, 5: -0.1542159,
                  6: -0.2289213, 7: 1.6609565, 2**32: -0.9015923, 2**32 + 1: 1.2910055, 2**40 + 3: -0.6229761}
FIXED_RADEMACHER = [-1, 1, 1, -1, -1, 1, -1, -1]


def test_fixed_values_of_the_contract_python_and_oracle():
    """The published values of docs/noise.md section 7 (for new backends to test against) hold for the
    pure-Python Philox, the tensor Philox, the oracle's z (Gaussian to the 7 printed decimals,
    Rademacher exactly), derive_seed and key_from_name."""
    k = (FIXED_SEED & MASK32, FIXED_SEED >> 32)
    assert N.philox4x32((0, 0, FIXED_KEY, 0), k) == FIXED_WORDS_CALL0
    assert tuple(int(w) for w in R.philox4x32(0, 0, FIXED_KEY, 0, *k)) == FIXED_WORDS_CALL0
    assert tuple(int(w) for w in R.raw_bits(torch.tensor(3), FIXED_SEED, FIXED_KEY, 0)) == FIXED_WORDS_CALL0
    idx = torch.tensor(list(FIXED_GAUSSIAN))
    torch.testing.assert_close(R.noise_at(idx, FIXED_SEED, FIXED_KEY).double(),
                               torch.tensor(list(FIXED_GAUSSIAN.values()), dtype=torch.float64),
                               rtol=0, atol=6e-8)
    assert R.noise(8, FIXED_SEED, FIXED_KEY, "rademacher").tolist() == FIXED_RADEMACHER
    assert derive_seed(0, 0) == 0x3ED3F23B51DC4D72
    assert derive_seed(42, 1, 0) == 0x2734CA6D65657F26
    assert derive_seed(42, 1, 1) == 0x5CE0A76B78E38996
    assert key_from_name("model.decoder.layers.0.fc1.weight") == 0xA68EE8D2
    assert key_from_name("module.model.decoder.layers.0.fc1.weight") == 0xA68EE8D2


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_fixed_values_of_the_contract_public_api(backend, device):
    """make_noise of every backend reproduces the published z of docs/noise.md section 7: Gaussian
    within NORMAL_ATOL * (1 + |z|) (plus the 5e-8 of the 7 printed decimals), including the 64-bit
    indices 2**32, 2**32 + 1 and 2**40 + 3; Rademacher exactly."""
    for i, expected in FIXED_GAUSSIAN.items():
        got = _noise(backend, device, 1, FIXED_SEED, FIXED_KEY, "gaussian", offset=i).item()
        assert abs(got - expected) <= NORMAL_ATOL * (1 + abs(expected)) + 5e-8, (i, got, expected)
    first8 = _noise(backend, device, 8, FIXED_SEED, FIXED_KEY, "gaussian")  # one call, not 8
    published = torch.tensor([FIXED_GAUSSIAN[i] for i in range(8)], dtype=torch.float64)
    assert bool(((first8 - published).abs() <= NORMAL_ATOL * (1 + published.abs()) + 5e-8).all())
    assert _noise(backend, device, 8, FIXED_SEED, FIXED_KEY, "rademacher").tolist() == FIXED_RADEMACHER


def test_triton_philox_fixed_words(triton_device):
    """The Triton Philox gives the published words of call 0 of docs/noise.md section 7."""
    out = _triton_philox(torch.tensor([[0, 0, FIXED_KEY, 0]]),
                         torch.tensor([[FIXED_SEED & MASK32, FIXED_SEED >> 32]]), triton_device)
    assert tuple(out[0].tolist()) == FIXED_WORDS_CALL0


# ------------------------------------------------------------------------------------------------
# The oracle against the contract in plain Python
# ------------------------------------------------------------------------------------------------

def _contract_z(index: int, seed: int, key: int, kind: N.Noise) -> float:
    """z at one global index, computed from docs/noise.md with Python ints and math (float64)."""
    per_call = N.ELEMENTS_PER_CALL[kind]
    ctr, lane = divmod(index, per_call)
    x = N.philox4x32((ctr & MASK32, ctr >> 32, key, int(kind)), (seed & MASK32, seed >> 32))
    if kind is N.Noise.RADEMACHER:
        return 1.0 - 2.0 * ((x[lane // 32] >> (lane % 32)) & 1)
    ua, ub = ((x[lane // 2 * 2] >> 9) * 2 + 1) * 2.0 ** -24, ((x[lane // 2 * 2 + 1] >> 9) * 2 + 1) * 2.0 ** -24
    r = math.sqrt(-2.0 * math.log(ua))
    t = math.pi * (2.0 * ub - 1.0)
    return r * math.cos(t) if lane % 2 == 0 else r * math.sin(t)


@pytest.mark.parametrize("kind", list(N.Noise), ids=lambda k: k.name.lower())
def test_oracle_matches_contract_in_plain_python(kind):
    """oracle.noise_at equals the contract computed element by element with Python ints: counter =
    (lo32(i // P), hi32(i // P), key, stream), key = (seed lo, seed hi), Box-Muller on word pairs
    (x0, x1), (x2, x3) or bit l % 32 of word l // 32. Indices include every lane of a call and 64-bit
    ones (up to 2**62); seed and key use the high bit of every word. Rademacher must be exact; normals
    are float64 rounded to float32 in the oracle, so they agree to float32 rounding (2**-23 relative)."""
    g = _gen(6)
    index = torch.cat([torch.arange(0, 260), torch.randint(0, 1 << 62, (300,), generator=g),
                       torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 4 * 2**32 + 3, 128 * 2**32 + 127])])
    for seed, key in [(0, 0), (0xDEADBEEFCAFEF00D, 0x80000001), (2**64 - 1, MASK32)]:
        z = R.noise_at(index, seed, key, kind)
        assert z.dtype == torch.float32
        expected = torch.tensor([_contract_z(i, seed, key, kind) for i in index.tolist()], dtype=torch.float64)
        if kind is N.Noise.RADEMACHER:
            assert torch.equal(z.double(), expected)
        else:
            torch.testing.assert_close(z.double(), expected, rtol=2.0 ** -23, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Fast backends against the oracle
# ------------------------------------------------------------------------------------------------

BITS_CASES = [(0, 0, 0), (1234, 7, 5), (2**63 + 99, MASK32, 130), (2**64 - 1, 2**31, 2**32 - 3)]


@pytest.mark.parametrize("seed,key,offset", BITS_CASES)
def test_rademacher_bits_identical_to_oracle(triton_device, seed, key, offset):
    """Rademacher z is a pure function of the Philox bits, so the Triton kernel and the oracle must agree
    exactly: this checks that both backends make the same raw bits from the same (seed, key, counter,
    stream), for seeds and keys with the top bit set and for an unaligned offset."""
    got = _noise("triton", triton_device, N_STAT, seed, key, "rademacher", offset)
    expected = R.noise(N_STAT, seed, key, N.Noise.RADEMACHER, offset).double()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("seed,key,offset", BITS_CASES)
def test_gaussian_close_to_oracle(triton_device, seed, key, offset):
    """Triton normals (float32 transcendentals) agree with the float64 oracle within the documented
    NORMAL_ATOL * (1 + |z|); a bit of the uniforms read wrongly would be off by far more."""
    got = _noise("triton", triton_device, N_STAT, seed, key, "gaussian", offset)
    expected = R.noise(N_STAT, seed, key, N.Noise.GAUSSIAN, offset).double()
    err = (got - expected).abs()
    assert bool((err <= NORMAL_ATOL * (1 + expected.abs())).all()), f"max error {err.max().item()}"


# Indices straddling 2**31 (int32 overflow), 2**32 (the low counter word for an index used as a
# counter), and where the counter itself crosses 2**32 (index 4 * 2**32 for Gaussian, 128 * 2**32 for
# Rademacher), far beyond (2**40 + 5), and near the largest offset the API accepts (2**62).
LARGE_OFFSETS = [2**31 - 1, 2**31 + 1, 2**32 - 3, 2**32 + 7, 4 * 2**32 - 6, 128 * 2**32 - 200,
                 2**40 + 5, 2**62 - 1000]


@pytest.mark.parametrize("offset", LARGE_OFFSETS)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_64bit_offsets_match_oracle(triton_device, kind, offset):
    """make_noise at a 64-bit offset (triton backend) equals the oracle's noise_at at those global
    indices: Rademacher exactly, Gaussian within NORMAL_ATOL * (1 + |z|)."""
    m = 1000
    got = _noise("triton", triton_device, m, 77, 3, kind, offset)
    expected = R.noise_at(torch.arange(offset, offset + m), 77, 3, kind).double()
    if kind == "rademacher":
        assert torch.equal(got, expected)
    else:
        assert bool(((got - expected).abs() <= NORMAL_ATOL * (1 + expected.abs())).all())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_shard_noise_equals_slice_of_full_noise(backend, device, kind):
    """The noise of a shard (offset k, length m) is bit for bit the slice [k:k+m] of the unsharded
    tensor's noise, for k not a multiple of 4 or 128 and shards ending mid-call; and perturb_ of a shard
    with offsets=[k] equals the slice of perturb_ of the whole tensor (same arithmetic per element)."""
    full_n = 2000
    full = _noise(backend, device, full_n, 11, 4, kind)
    for k, m in [(1, 1), (3, 77), (5, 600), (127, 129), (130, 1000), (257, 1743), (1001, 999)]:
        shard = _noise(backend, device, m, 11, 4, kind, offset=k)
        assert torch.equal(shard, full[k:k + m]), (k, m)

    x = torch.randn(full_n, generator=_gen(12)).to(device)
    whole = x.clone()
    F.perturb_([whole], 11, 0.375, keys=[4], noise=kind, backend=backend)
    for k, m in [(3, 77), (130, 1000), (1001, 999)]:
        part = x[k:k + m].clone()
        F.perturb_([part], 11, 0.375, keys=[4], noise=kind, offsets=[k], backend=backend)
        assert torch.equal(part, whole[k:k + m]), (k, m)


@pytest.mark.parametrize("kind", [0, 1], ids=["gaussian", "rademacher"])
def test_noise_independent_of_block_size(triton_device, kind):
    """The raw launcher gives bit-identical output for block sizes 128 .. 65536 (one to many programs,
    and tiles straddling a shard start), both for z alone (load_x=False) and for x + b z: noise is a
    function of the global index only."""
    n, offset = 6000, 131
    x0 = torch.randn(n, generator=_gen(13)).to(triton_device)
    zs, ys = [], []
    # 65536 is the interpreter's default block; on the GPU (default 4096) a 65536-element program only
    # costs half a minute of compilation, so 8192 stands in for "larger than the default" there.
    for block in (128, 512, 4096, 8192 if HAS_CUDA else 65536):
        z = torch.full((n,), float("nan"), device=triton_device)
        launch_axpbz(z, 0.0, 1.0, 2**40 + 17, 9, kind, offset=offset, block=block, load_x=False)
        y = x0.clone()
        launch_axpbz(y, 1.0, 0.25, 2**40 + 17, 9, kind, offset=offset, block=block)
        zs.append(z.cpu())
        ys.append(y.cpu())
    for z, y in zip(zs[1:], ys[1:]):
        assert torch.equal(z, zs[0])
        assert torch.equal(y, ys[0])
    # And it is the right noise, not merely the same wrong noise for every block.
    expected = R.noise(n, 2**40 + 17, 9, kind, offset).double()
    assert bool(((zs[0].double() - expected).abs() <= NORMAL_ATOL * (1 + expected.abs())).all())


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_noise_independent_of_dtype(backend, device):
    """z does not depend on the dtype of the tensor it lands in: (1) what perturb_(alpha=1) adds to a
    float32 tensor is the float32 z of make_noise, up to the one rounding of x + z (half an ulp of the
    result); (2) make_noise into a float16 buffer is the float32 z rounded to float16 (numpy/CUDA
    round to nearest: exact), and into bfloat16 within one bfloat16 ulp of it (the backend's z differs
    from the oracle's within the contract's tolerance, which can flip a bfloat16 rounding)."""
    n = 4097
    z32 = F.make_noise(n, 21, 2, device=device, backend=backend).cpu()
    x = torch.randn(n, generator=_gen(14))
    y = x.clone().to(device)  # clone: .to() of a CPU tensor to "cpu" is the same tensor
    F.perturb_([("w", y)], 21, 1.0, keys=[2], backend=backend)
    y = y.cpu()
    assert bool(((y.double() - (x.double() + z32.double())).abs() <= 0.5 * ulp(y)).all())

    z16 = F.make_noise(n, 21, 2, device=device, dtype=torch.float16, backend=backend).cpu()
    assert z16.dtype == torch.float16
    assert torch.equal(z16, z32.to(torch.float16))
    zb = F.make_noise(n, 21, 2, device=device, dtype=torch.bfloat16, backend=backend).cpu()
    rb = z32.to(torch.bfloat16)
    assert bool(((zb.float() - rb.float()).abs() <= torch.maximum(ulp(zb), ulp(rb))).all())

    like = F.noise_like(torch.empty(17, 241, device=device), 21, 2, backend=backend)
    assert like.shape == (17, 241) and like.dtype == torch.float32
    assert torch.equal(like.cpu().reshape(-1), z32)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("seed", [0, 2**64 - 1])
def test_gaussian_moments(backend, device, seed):
    """Gaussian z over N_STAT = 32640 draws: mean 0 (SE 1/sqrt(n) = 0.0055), variance 1 (SE sqrt(2/n)),
    skewness 0 (SE sqrt(6/n)), kurtosis 3 (SE sqrt(24/n)), each within 5 SE; every value finite and
    |z| <= sqrt(-2 ln 2**-24) = 5.77, the largest radius the 23-bit uniform allows. The same holds for
    each of the 4 lanes of a Philox call separately (n/4 draws each)."""
    z = _noise(backend, device, N_STAT, seed, 5)
    assert bool(torch.isfinite(z).all())
    assert z.abs().max().item() <= math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-5

    def check(v):
        n = v.numel()
        m = v.mean().item()
        c = v - m
        var = (c ** 2).mean().item()
        skew = (c ** 3).mean().item() / var ** 1.5
        kurt = (c ** 4).mean().item() / var ** 2
        assert abs(m) < 5 / math.sqrt(n), m
        assert abs(var - 1) < 5 * math.sqrt(2 / n), var
        assert abs(skew) < 5 * math.sqrt(6 / n), skew
        assert abs(kurt - 3) < 5 * math.sqrt(24 / n), kurt

    check(z)
    for lane in range(4):
        check(z[lane::4])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_gaussian_cdf(backend, device):
    """Goodness of fit of the Gaussian CDF (torch.special.ndtr) over N_STAT draws:
    * chi-square over 32 equiprobable bins of ndtr(z): 31 degrees of freedom, bound 31 + 6 sqrt(62);
    * Kolmogorov-Smirnov: sqrt(n) D < 2.5 (P(exceed) ~ 2 exp(-2 * 2.5**2) = 7.5e-6);
    * the empirical CDF at z = -3 .. 3 within 5 binomial SE of Phi(z) (tails included)."""
    z = _noise(backend, device, N_STAT, 31, 6)
    u = torch.special.ndtr(z)
    bins = 32
    counts = torch.bincount(torch.clamp((u * bins).long(), max=bins - 1), minlength=bins).double()
    expected = N_STAT / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = bins - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2

    us = torch.sort(u).values
    i = torch.arange(1, N_STAT + 1, dtype=torch.float64)
    d = max(float((i / N_STAT - us).max()), float((us - (i - 1) / N_STAT).max()))
    assert math.sqrt(N_STAT) * d < 2.5, d

    for q in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0):
        p = float(torch.special.ndtr(torch.tensor(q, dtype=torch.float64)))
        frac = float((z <= q).double().mean())
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / N_STAT), (q, frac, p)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_rademacher_values_and_balance(backend, device):
    """Rademacher z is exactly +-1 (both signs occur); mean 0 within 5 SE; and each of the 128 lanes of
    a Philox call is balanced: sum over lanes of (lane sum)**2 / (draws per lane) is chi-square with
    128 degrees of freedom, bound 128 + 6 sqrt(256). A stuck or duplicated bit would add ~384."""
    z = _noise(backend, device, N_STAT, 41, 7, "rademacher")
    assert bool(((z == 1.0) | (z == -1.0)).all())
    assert abs(z.mean().item()) < 5 * SE
    per_lane = z.view(-1, 128)
    m = per_lane.shape[0]
    chi2 = float((per_lane.sum(0) ** 2 / m).sum())
    assert chi2 < 128 + 6 * math.sqrt(2 * 128), chi2


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind,lags", [("gaussian", (1, 2, 3, 4, 5, 8)),
                                       ("rademacher", (1, 2, 31, 32, 33, 64, 127, 128, 129))])
def test_no_correlation_between_neighbours(backend, device, kind, lags):
    """Lag-k autocorrelation of z is 0 within 5/sqrt(n) for lags inside one Philox call (between lanes,
    between the two Box-Muller pairs, between words of the Rademacher call) and across neighbouring
    counters. For Gaussian also the squares: z0**2 and z1**2 of one Box-Muller pair share nothing if the
    radius and the angle come from different words (for independent values the sample correlation has
    SE 1/sqrt(n) whatever their distribution)."""
    z = _noise(backend, device, N_STAT, 51, 8, kind)
    for lag in lags:
        assert abs(_corr(z[:-lag], z[lag:])) < 5 * SE, lag
        if kind == "gaussian":
            assert abs(_corr(z[:-lag] ** 2, z[lag:] ** 2)) < 5 * SE, lag


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_no_correlation_across_keys(backend, device):
    """Noise of different tensor keys (neighbouring, top bit set, all ones, a name key) under one seed
    is pairwise uncorrelated within 5/sqrt(n), for both distributions."""
    keys = [0, 1, 2, 2**31, MASK32, key_from_name("encoder.layer.0.weight")]
    for kind in ("gaussian", "rademacher"):
        zs = [_noise(backend, device, N_STAT, 61, k, kind) for k in keys]
        for i in range(len(zs)):
            for j in range(i + 1, len(zs)):
                assert abs(_corr(zs[i], zs[j])) < 5 * SE, (kind, keys[i], keys[j])


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_no_correlation_across_streams(backend, device):
    """Gaussian and Rademacher noise of the same (seed, key) are uncorrelated within 5/sqrt(n), also
    between the sign of the Gaussian and the Rademacher sign (test_raw_bits_avalanche checks that the
    stream word itself changes the bits of one and the same counter)."""
    g = _noise(backend, device, N_STAT, 71, 3, "gaussian")
    r = _noise(backend, device, N_STAT, 71, 3, "rademacher")
    assert abs(_corr(g, r)) < 5 * SE
    assert abs(_corr(torch.sign(g), r)) < 5 * SE


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_no_correlation_across_derived_seeds(backend, device):
    """Noise under the derived seeds of consecutive steps and of both directions of a step (and under
    the base seed itself) is pairwise uncorrelated within 5/sqrt(n)."""
    base = 2024
    seeds = [base] + [derive_seed(base, step, d) for step in range(3) for d in range(2)]
    zs = [_noise(backend, device, N_STAT, s, 0) for s in seeds]
    for i in range(len(zs)):
        for j in range(i + 1, len(zs)):
            assert abs(_corr(zs[i], zs[j])) < 5 * SE, (i, j)


@pytest.mark.parametrize("change", ["stream", "key_bit0", "key_bit31", "seed_bit0", "seed_bit32",
                                    "seed_bit63", "counter_hi"])
def test_raw_bits_avalanche(change):
    """Changing one bit of any input of the hash (stream, key, either seed word, the counter's high
    word) changes each output bit with probability 1/2: the fraction of equal bits over 4096 calls x 128
    bits is 0.5 within 5 SE (SE = 0.5 / sqrt(524288)). Checks that every input enters the counter or
    key of the oracle's raw_bits at the documented place."""
    n = 4096
    index = torch.arange(0, 4 * n, 4)  # one element per Gaussian Philox call
    seed, key, stream = 0x0123456789ABCDEF, 0x1000, 0
    base = torch.stack(R.raw_bits(index, seed, key, stream))
    if change == "stream":
        other = R.raw_bits(index, seed, key, 1)
    elif change.startswith("key_bit"):
        other = R.raw_bits(index, seed, key ^ (1 << int(change[7:])), stream)
    elif change.startswith("seed_bit"):
        other = R.raw_bits(index, seed ^ (1 << int(change[8:])), key, stream)
    else:
        other = R.raw_bits(index + 4 * 2**32, seed, key, stream)
    other = torch.stack(other)
    diff = base ^ other
    differing = sum(int(((diff >> b) & 1).sum()) for b in range(32))
    total = 32 * diff.numel()
    frac_equal = 1 - differing / total
    assert abs(frac_equal - 0.5) < 5 * 0.5 / math.sqrt(total), frac_equal


# ------------------------------------------------------------------------------------------------
# derive_seed
# ------------------------------------------------------------------------------------------------

def test_derive_seed_follows_the_contract():
    """derive_seed(base, step, direction) = words 0 | 1 << 32 of Philox4x32-10 with key = base (lo, hi)
    and counter = (step lo, step hi, direction, 0x5EED5EED), for random 64-bit inputs."""
    g = _gen(81)
    bases = torch.randint(0, 1 << 62, (20,), generator=g).tolist() + [0, 2**64 - 1]
    steps = torch.randint(0, 1 << 62, (20,), generator=g).tolist() + [2**64 - 1, 0]
    for i, (b, s) in enumerate(zip(bases, steps)):
        d = i % 3
        x = N.philox4x32((s & MASK32, s >> 32, d, 0x5EED5EED), (b & MASK32, b >> 32))
        assert derive_seed(b, s, d) == x[0] | (x[1] << 32)


def test_derive_seed_deterministic_distinct_and_in_range():
    """derive_seed is a pure function (same inputs, same seed, numpy ints accepted as ints), its seeds
    are in [0, 2**64) and distinct over 4000 (step, direction) pairs plus steps that differ only in the
    high word (1 vs 2**32) and bases that differ only in the high word."""
    assert derive_seed(5, 10, 1) == derive_seed(5, 10, 1)
    assert derive_seed(np.uint64(5), np.int64(10), 1) == derive_seed(5, 10, 1)
    seeds = [derive_seed(123, step, d) for step in range(1000) for d in range(4)]
    seeds += [derive_seed(123, s, 0) for s in (2**32, 2**32 + 1, 2**63, 2**64 - 1)]
    seeds += [derive_seed(123 + 2**32, 0, 0), derive_seed(2**64 - 1, 0, 0), derive_seed(0, 0, 2**32 - 1)]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2**64 for s in seeds)
    # a full 64-bit range is used: high words are not all zero
    assert any(s >> 63 for s in seeds) and any(not s >> 63 for s in seeds)


@pytest.mark.parametrize("args,exc,word", [
    ((-1, 0), ValueError, "base_seed"),
    ((2**64, 0), ValueError, "base_seed"),
    ((1.0, 0), TypeError, "base_seed"),
    (("1", 0), TypeError, "base_seed"),
    ((True, 0), TypeError, "base_seed"),
    ((0, -1), ValueError, "step"),
    ((0, 2**64), ValueError, "step"),
    ((0, 2.5), TypeError, "step"),
    ((0, None), TypeError, "step"),
    ((0, 0, -1), ValueError, "direction"),
    ((0, 0, 2**32), ValueError, "direction"),
])
def test_derive_seed_rejects_bad_inputs(args, exc, word):
    """Negative, too large and non-int arguments raise TypeError/ValueError naming the argument."""
    with pytest.raises(exc, match=word):
        derive_seed(*args)


@pytest.mark.parametrize("direction", [1.5, "1", True, None])
def test_derive_seed_rejects_non_int_direction(direction):
    """A non-int direction raises like a non-int step does (1.5 must not silently become 1, nor True 1)."""
    with pytest.raises(TypeError, match="direction"):
        derive_seed(0, 0, direction)


# ------------------------------------------------------------------------------------------------
# key_from_name
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrapped,plain", [
    ("module.encoder.weight", "encoder.weight"),
    ("base_model.model.x", "x"),
    ("_orig_mod.module.x", "x"),
    ("module._orig_mod.x", "x"),
    ("_orig_mod.base_model.model.model.layers.0.q_proj.weight", "model.layers.0.q_proj.weight"),
    ("encoder._fsdp_wrapped_module.layer.0.weight", "encoder.layer.0.weight"),
    ("layers.0._checkpoint_wrapped_module.mlp.bias", "layers.0.mlp.bias"),
])
def test_key_from_name_strips_wrapper_prefixes(wrapped, plain):
    """Wrapper prefixes (DDP/FSDP module., torch.compile _orig_mod., PEFT base_model.model., FSDP and
    checkpoint wrappers) do not change a parameter's key; the key is CRC-32 of the plain name."""
    assert key_from_name(wrapped) == key_from_name(plain) == zlib.crc32(plain.encode("utf-8"))


def test_key_from_name_is_32_bit_and_separates_names():
    """Keys are ints in [0, 2**32), stable (CRC-32 of UTF-8, not Python's salted hash), and distinct
    for the distinct names of a model; names that merely contain a wrapper word are left alone."""
    names = [f"model.layers.{i}.{p}" for i in range(64) for p in ("q.weight", "k.weight", "v.weight",
                                                                   "o.weight", "norm.bias")]
    keys = [key_from_name(n) for n in names]
    assert all(isinstance(k, int) and 0 <= k <= MASK32 for k in keys)
    assert len(set(keys)) == len(keys)
    assert key_from_name("encoder.weight") == zlib.crc32(b"encoder.weight")
    assert key_from_name("décodeur.poids") == zlib.crc32("décodeur.poids".encode("utf-8"))
    assert key_from_name("submodule.weight") == zlib.crc32(b"submodule.weight")
    assert key_from_name("my_module.weight") != key_from_name("weight")
