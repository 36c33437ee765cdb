"""docs/noise.md implemented a second time, from the document alone, and held against the library.

The generator below (numpy, Python ints and zlib) was written from docs/noise.md only: it imports nothing
of fastmezo's noise or oracle internals. fastmezo is only the thing under test, through its public
functions: fastmezo.functional.make_noise / perturb_ / restore_and_update_ (with rounding_seed),
fastmezo.derive_seed, fastmezo.key_from_name and fastmezo.noise.rounding_seed, on every backend that runs
here (conftest.backend_devices(); the Triton kernels through the interpreter on a CPU).

What must match, on random seeds, keys, offsets (up to the largest accepted, 2**62 - 1) and dtypes:
  * the fixed values of the document (section 1 and 7) and the document text that states them;
  * derive_seed, rounding_seed and key_from_name: equal;
  * Rademacher z and every value a Rademacher pass stores, rounded to nearest or stochastically: bit for
    bit (they are functions of Philox bits and IEEE float32 operations only);
  * Gaussian z within 1e-5 (1 + |z|), and every value a Gaussian pass stores (float32, float16, bfloat16;
    to nearest or stochastically) between what this implementation stores for the smallest and the
    largest float32 z' within that tolerance (docs/noise.md section 3, "Agreement between backends");
  * the worked claim of section 8 that the rounding sum r + q is a float32 sum.
Sizes are small: the Triton interpreter runs each program (65536 elements) in Python.
"""
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmezo
from fastmezo import functional as F
from fastmezo.noise import rounding_seed as library_rounding_seed

from conftest import backend_devices

DOC = (Path(__file__).resolve().parent.parent / "docs" / "noise.md").read_text(encoding="utf-8")
PAIRS = backend_devices()
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
MASK32 = 0xFFFFFFFF
MAX_OFFSET = (1 << 62) - 1
TOLERANCE = 1e-5   # section 3: |z - z_ref| <= TOLERANCE * (1 + |z_ref|)

# The edge cases overflow on purpose (y beyond the largest finite value, inf - inf): numpy and the
# Triton interpreter warn about what the contract defines.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _interpreted_triton(backend, device):
    return backend == "triton" and device == "cpu"


# ------------------------------------------------------------------------------------------------
# The contract, from the document (sections 1 to 8)
# ------------------------------------------------------------------------------------------------

def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Section 1, on numpy uint64 arrays holding 32-bit words (a 32 x 32-bit product fits in 64 bits)."""
    c0, c1, c2, c3 = np.broadcast_arrays(*(np.asarray(c, dtype=np.uint64) & np.uint64(MASK32)
                                           for c in (c0, c1, c2, c3)))
    k0, k1 = k0 & MASK32, k1 & MASK32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & np.uint64(MASK32),
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & np.uint64(MASK32))
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def philox_once(counter, key):
    """One call on Python ints: 4 ints."""
    return tuple(int(w) for w in philox4x32_10(*counter, *key))


def _calls(index, per_call, key, stream, seed):
    """Section 2: the words of call i // P of element indices ``index`` (uint64 array)."""
    q = index // np.uint64(per_call)
    return philox4x32_10(q & np.uint64(MASK32), q >> np.uint64(32), key, stream, seed & MASK32, seed >> 32)


def _indices(offset, n):
    return np.uint64(offset) + np.arange(n, dtype=np.uint64)


def uniform(x):
    """Section 3: (2 * (x >> 9) + 1) * 2**-24, exact in float32 and float64."""
    return ((x >> np.uint64(9)) * np.uint64(2) + np.uint64(1)).astype(np.float64) * 2.0 ** -24


def rademacher(n, seed, key, offset=0):
    index = _indices(offset, n)
    words = np.stack(_calls(index, 128, key, 1, seed))
    lane = index % np.uint64(128)
    word = words[(lane // np.uint64(32)).astype(np.int64), np.arange(n)]
    bit = (word >> (lane % np.uint64(32))) & np.uint64(1)
    return (1.0 - 2.0 * bit.astype(np.float64)).astype(np.float32)


def gaussian(n, seed, key, offset=0):
    """Section 3 as the reference computes it: float64 Box-Muller, rounded once to float32."""
    index = _indices(offset, n)
    words = np.stack(_calls(index, 4, key, 0, seed))
    lane = (index % np.uint64(4)).astype(np.int64)
    pair = lane // 2 * 2                                  # lanes 0, 1 use (x0, x1); lanes 2, 3 (x2, x3)
    u_a = uniform(words[pair, np.arange(n)])
    u_b = uniform(words[pair + 1, np.arange(n)])
    r = np.sqrt(-2.0 * np.log(u_a))
    t = math.pi * (2.0 * u_b - 1.0)
    return np.where(lane % 2 == 0, r * np.cos(t), r * np.sin(t)).astype(np.float32)


def noise(kind, n, seed, key, offset=0):
    return (gaussian if kind == "gaussian" else rademacher)(n, seed, key, offset)


def rounding_draws(n, round_seed, key, offset=0):
    """Section 8: element i takes word (i % 8) // 2 of call i // 8 of stream 2, low half for even i."""
    index = _indices(offset, n)
    words = np.stack(_calls(index, 8, key, 2, round_seed))
    lane = index % np.uint64(8)
    word = words[(lane // np.uint64(2)).astype(np.int64), np.arange(n)]
    return ((word >> (np.uint64(16) * (lane % np.uint64(2)))) & np.uint64(0xFFFF)).astype(np.int64)


def derive_seed(base, step, direction=0):
    """Section 6."""
    x = philox_once((step & MASK32, step >> 32, direction, 0x5EED5EED), (base & MASK32, base >> 32))
    return x[0] | (x[1] << 32)


def rounding_seed(seed, pass_index):
    """Section 8."""
    x = philox_once((pass_index & MASK32, pass_index >> 32, 0, 2), (seed & MASK32, seed >> 32))
    return x[0] | (x[1] << 32)


WRAPPER_COMPONENTS = {"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


def canonical_name(name: str) -> str:
    """Section 5: drop wrapper components (never the last component) until none is left."""
    parts = name.split(".")
    removed = True
    while removed:
        removed = False
        for j in range(len(parts) - 1):
            if parts[j] in WRAPPER_COMPONENTS:
                del parts[j]
                removed = True
                break
            if parts[j] == "base_model" and parts[j + 1] == "model" and j + 2 < len(parts):
                del parts[j:j + 2]
                removed = True
                break
    return ".".join(parts)


def key_from_name(name: str) -> int:
    return zlib.crc32(canonical_name(name).encode("utf-8"))


# Storage formats (Notation): float16 = IEEE binary16; bfloat16 = the top half of a float32.
# (largest finite value, exponent of the smallest normal, stored mantissa bits)
FORMATS = {torch.float16: (65504.0, -14, 10), torch.bfloat16: ((2 - 2.0 ** -7) * 2.0 ** 127, -126, 7)}


def nearest_bits(y, dtype):
    """float32 y -> bit patterns of dtype, round to nearest, ties to even (numpy's float16 conversion is
    IEEE; bfloat16 keeps the top 16 bits of the float32 after adding half an ulp, ties to even)."""
    y = np.asarray(y, dtype=np.float32)
    if dtype == torch.float32:
        return y.view(np.uint32)
    if dtype == torch.float16:
        return y.astype(np.float16).view(np.uint16)
    u = y.view(np.uint32).astype(np.uint64)
    bits = ((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)).astype(np.uint16)
    return np.where(np.isnan(y), np.uint16(0x7FC0), bits)


def _exact_bits(v, dtype):
    """Bits of values that dtype represents exactly (float64 array)."""
    if dtype == torch.float16:
        return v.astype(np.float16).view(np.uint16)
    return (v.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def stochastic_bits(y, r, dtype):
    """Section 8: lo = y toward zero in dtype, hi = next away from zero, q = 2**16 |y - lo| / |hi - lo|,
    hi if the float32 sum q + r >= 2**16; beyond the largest finite value: saturate; non-finite: nearest."""
    y = np.asarray(y, dtype=np.float32)
    if dtype == torch.float32:
        return y.view(np.uint32)
    largest, min_exp, mantissa = FORMATS[dtype]
    a = np.abs(y.astype(np.float64))
    finite = np.isfinite(a)
    a_f = np.where(finite, a, 0.0)
    _, exp = np.frexp(a_f)                                  # a = m 2**exp, m in [0.5, 1)
    gap = np.ldexp(1.0, np.maximum(exp - 1, min_exp) - mantissa)
    lo = np.floor(a_f / gap) * gap
    q = (a_f - lo) / gap * 65536.0
    assert np.array_equal(q.astype(np.float32).astype(np.float64), q), "q must be exact in float32"
    up = (q.astype(np.float32) + np.asarray(r).astype(np.float32)) >= np.float32(65536.0)
    mag = np.where(a_f > largest, largest, lo + np.where(up, gap, 0.0))
    bits = _exact_bits(np.copysign(mag, y.astype(np.float64)), dtype)
    return np.where(finite, bits, nearest_bits(y, dtype))


def pass_bits(x, a, b, z, dtype, r=None):
    """Sections 3 and 8: y = a * x + b * z in float32 (a, b rounded to float32; two rounded products and a
    rounded sum), rounded once to dtype; to nearest, or stochastically with the draws r."""
    x32 = np.asarray(x, dtype=np.float32)
    y = np.float32(a) * x32 + np.float32(b) * np.asarray(z, dtype=np.float32)
    return nearest_bits(y, dtype) if r is None else stochastic_bits(y, r, dtype)


def values_of(bits, dtype):
    """float64 values of bit patterns of dtype."""
    if dtype == torch.float32:
        return bits.view(np.float32).astype(np.float64)
    if dtype == torch.float16:
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def tolerance_interval(z_ref):
    """The smallest and the largest float32 within TOLERANCE * (1 + |z_ref|) of z_ref (section 3)."""
    z = z_ref.astype(np.float64)
    tol = TOLERANCE * (1.0 + np.abs(z))
    lo = (z - tol).astype(np.float32)
    lo = np.where(lo.astype(np.float64) < z - tol, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = (z + tol).astype(np.float32)
    hi = np.where(hi.astype(np.float64) > z + tol, np.nextafter(hi, np.float32(-np.inf)), hi)
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Helpers for the library side
# ------------------------------------------------------------------------------------------------

def _bits_of(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


def _assert_bits_equal(got_bits, want_bits, dtype, what):
    """Equal bits, where NaN counts as NaN whatever its payload (the contract leaves NaN bits open)."""
    got_v, want_v = values_of(got_bits, dtype), values_of(want_bits, dtype)
    nan = np.isnan(want_v)
    assert np.array_equal(np.isnan(got_v), nan), what
    bad = np.flatnonzero((got_bits != want_bits) & ~nan)
    assert bad.size == 0, f"{what}: {bad.size} of {got_bits.size} differ, first at {bad[:5].tolist()}"


def _assert_between(got_bits, bits_lo, bits_hi, dtype, what):
    """Each stored value lies between the values stored for the two ends of the tolerance interval."""
    got, a, b = values_of(got_bits, dtype), values_of(bits_lo, dtype), values_of(bits_hi, dtype)
    low, high = np.minimum(a, b), np.maximum(a, b)
    bad = np.flatnonzero(~((got >= low) & (got <= high)))
    assert bad.size == 0, (f"{what}: {bad.size} of {got.size} outside the tolerance, first at {bad[:5].tolist()}: "
                           f"got {got[bad[:3]].tolist()}, allowed [{low[bad[:3]].tolist()}, {high[bad[:3]].tolist()}]")


def _random_x(n, dtype, rng):
    """Values of dtype of mixed magnitudes, zeros and float16 subnormals among them."""
    x = rng.standard_normal(n) * np.exp2(rng.integers(-30, 8, n))
    x[::17] = 0.0
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def _cases(backend, device, rng, count):
    """(seed, key, offset, n): seeds and keys with their top bits set, offsets unaligned, past 2**32 and up to
    the largest accepted, 2**62 - 1."""
    cases = [(0, 0, 0, 1), (2**64 - 1, MASK32, MAX_OFFSET, 130), (0x0123456789ABCDEF, 7, 2**32 - 5, 257)]
    for _ in range(count):
        offset = int(rng.choice([int(rng.integers(0, 1 << 12)), int(rng.integers(0, 1 << 62))]))
        cases.append((int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)), int(rng.integers(0, 2**32)),
                      offset, int(rng.integers(1, 600))))
    return cases[:4] if _interpreted_triton(backend, device) else cases


# ------------------------------------------------------------------------------------------------
# The document's own values
# ------------------------------------------------------------------------------------------------

def _in_doc(text):
    assert text in DOC, f"docs/noise.md no longer states {text!r}"


def test_fixed_values_of_the_document():
    """Sections 1 and 7: this implementation gives every published value, and the document states them."""
    for counter, key, out in [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
                              ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
                              ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                               (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]:
        assert philox_once(counter, key) == out
        _in_doc(" ".join(f"{w:08x}" for w in out))
    seed, key = 0x0123456789ABCDEF, 7
    words = philox_once((0, 0, key, 0), (seed & MASK32, seed >> 32))
    _in_doc(" ".join(f"{w:08x}" for w in words))
    first8 = gaussian(8, seed, key)
    far = np.concatenate([gaussian(1, seed, key, i) for i in (2**32, 2**32 + 1, 2**40 + 3)])
    for values in (first8, far):
        _in_doc(" ".join(f"{v:.7f}" for v in values.astype(np.float64)))
    _in_doc(" ".join(f"{int(v)}" for v in rademacher(8, seed, key)))
    _in_doc(f"derive_seed(0, 0) | {derive_seed(0, 0):#018x}")
    _in_doc(f"{derive_seed(42, 1, 0):#018x}, {derive_seed(42, 1, 1):#018x}")
    _in_doc(f"| {key_from_name('model.decoder.layers.0.fc1.weight'):#010x} |")
    name = "model.decoder.layers.0.fc1.weight"
    assert key_from_name("module." + name) == key_from_name(name)
    _in_doc(", ".join(f"{rounding_seed(seed, p):#018x}" for p in range(3)))
    _in_doc(" ".join(f"{w:08x}" for w in philox_once((0, 0, key, 2), (seed & MASK32, seed >> 32))))
    _in_doc(" ".join(f"{r:04x}" for r in rounding_draws(8, seed, key)))
    _in_doc(" ".join(f"{int(rounding_draws(1, seed, key, i)[0]):04x}" for i in (2**32, 2**32 + 1, 2**40 + 3)))


def test_worked_rounding_examples_of_the_document():
    """Section 8's worked examples, by this implementation."""
    y = np.array([1 + 2**-9, 1 + 2**-9], dtype=np.float32)
    assert stochastic_bits(y, [49151, 49152], torch.bfloat16).tolist() == [0x3F80, 0x3F81]
    y = np.array([2**-26, 2**-26, 1e6], dtype=np.float32)
    assert stochastic_bits(y, [49151, 49152, 0], torch.float16).tolist() == [0x0000, 0x0001, 0x7BFF]


# 2**20 elements: every backend but Triton's interpreter, too slow at that size (its rounding code,
# the exact float steps, is checked on small sizes by tests/test_rounding.py).
FAST_PAIRS = [p for p in PAIRS if not _interpreted_triton(*p)]


@pytest.mark.parametrize("backend,device", FAST_PAIRS, ids=[f"{b}-{d}" for b, d in FAST_PAIRS])
def test_float32_sum_of_the_rounding_decision(backend, device):
    """Section 8: float16 zeros plus y = +-1000.999 * 2**-40 (q = float32(1000.999), Rademacher signs):
    stored away from zero where the float32 sum r + q reaches 2**16. Over 2**20 elements (round seed
    0x0123456789ABCDEF, key 0) that is 17 elements more than an exact-arithmetic reading of r + q gives,
    as the document says; the library stores exactly the float32 reading (compiled Triton kernels with
    their own float16 subnormal formula among them)."""
    n, round_seed = 1 << 20, 0x0123456789ABCDEF
    q = np.float32(1000.999)
    r = rounding_draws(n, round_seed, 0)
    float32_up = (q + r.astype(np.float32)) >= np.float32(65536.0)
    exact_up = (float(q) + r) >= 65536
    more = int(float32_up.sum() - exact_up.sum())
    assert np.array_equal(float32_up & ~exact_up, float32_up != exact_up)  # only ever more round-ups
    _in_doc(f"{more} of 2^20 elements")
    alpha = float(q) * 2.0 ** -40
    y = np.float32(alpha) * rademacher(n, 5, 0)
    assert np.array_equal(stochastic_bits(y, r, torch.float16) & 0x7FFF != 0, float32_up)
    x = torch.zeros(n, dtype=torch.float16, device=device)
    F.perturb_([x], 5, alpha, keys=[0], noise="rademacher", rounding_seed=round_seed, backend=backend)
    got = _bits_of(x)
    assert int((got & 0x7FFF != 0).sum()) == int(float32_up.sum())
    _assert_bits_equal(got, stochastic_bits(y, r, torch.float16), torch.float16, backend)


# ------------------------------------------------------------------------------------------------
# Seeds and keys
# ------------------------------------------------------------------------------------------------

def test_seed_derivation_matches_the_library():
    rng = np.random.default_rng(1)
    cases = [(0, 0, 0), (2**64 - 1, 2**64 - 1, MASK32), (1, 2**32, 5)]
    cases += [(int(rng.integers(0, 2**63)) * 2 + 1, int(rng.integers(0, 2**63)) * 2, int(rng.integers(0, 2**32)))
              for _ in range(40)]
    for base, step, direction in cases:
        assert fastmezo.derive_seed(base, step, direction) == derive_seed(base, step, direction)
        assert library_rounding_seed(base, step) == rounding_seed(base, step)


NAME_PARTS = ["model", "layers", "0", "12", "q_proj", "weight", "bias", "module", "module", "_orig_mod",
              "base_model", "base_model", "model", "_fsdp_wrapped_module", "_checkpoint_wrapped_module",
              "submodule", "modules", "", "décodeur"]


@pytest.mark.parametrize("name,canonical", [
    ("module.module.encoder.weight", "encoder.weight"),                       # repeats at the start
    ("encoder.module.module.layer.weight", "encoder.layer.weight"),           # and inside
    ("_orig_mod.base_model.model.model.layers.0.q_proj.weight", "model.layers.0.q_proj.weight"),
    ("base_model.module.model.x", "x"),                                       # a removal joins base_model.model
    ("base_model.model.model.x", "model.x"),                                  # the pair, once: model.x stays
    ("x.module", "x.module"),                                                 # never the last component
    ("submodule.weight", "submodule.weight"),                                 # whole components only
])
def test_canonical_names_of_the_document(name, canonical):
    """Section 5's examples, by this implementation and by the library's key."""
    assert canonical_name(name) == canonical
    assert fastmezo.key_from_name(name) == zlib.crc32(canonical.encode("utf-8"))
    _in_doc(f"`{name}` -> `{canonical}`")


def test_name_keys_match_the_library_on_random_names():
    rng = np.random.default_rng(2)
    for _ in range(3000):
        name = ".".join(rng.choice(NAME_PARTS, size=int(rng.integers(1, 9))))
        assert fastmezo.key_from_name(name) == key_from_name(name), name


# ------------------------------------------------------------------------------------------------
# z
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [1 << 62, -1])
def test_offsets_outside_the_range_are_rejected(offset):
    """Section 2: offsets lie in [0, 2**62); others raise before anything is written."""
    backend, device = PAIRS[0]
    with pytest.raises(ValueError, match="2\\*\\*62"):
        F.make_noise(4, 1, 0, offset=offset, device=device, backend=backend)
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="2\\*\\*62"):
        F.perturb_([x], 1, 0.5, offsets=[offset], backend=backend)
    assert torch.equal(x, torch.zeros(4))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_rademacher_noise_bit_for_bit(backend, device):
    rng = np.random.default_rng(3)
    for seed, key, offset, n in _cases(backend, device, rng, 12):
        want = rademacher(n, seed, key, offset)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = F.make_noise(n, seed, key, noise="rademacher", offset=offset, device=device, dtype=dtype,
                               backend=backend)
            _assert_bits_equal(_bits_of(got), nearest_bits(want, dtype), dtype, f"{dtype} {seed:#x} {key} {offset}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_gaussian_noise_within_the_tolerance(backend, device):
    """float32 z within 1e-5 (1 + |z|); float16 / bfloat16 z (make_noise stores y = 1 * z) between the
    roundings of the two ends of that interval, which near z = 0 spans several ulp of the dtype."""
    rng = np.random.default_rng(4)
    for seed, key, offset, n in _cases(backend, device, rng, 12) + [(99, 3, 0, 4000)]:
        z_ref = gaussian(n, seed, key, offset)
        z_lo, z_hi = tolerance_interval(z_ref)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = F.make_noise(n, seed, key, offset=offset, device=device, dtype=dtype, backend=backend)
            _assert_between(_bits_of(got), nearest_bits(z_lo, dtype), nearest_bits(z_hi, dtype), dtype,
                            f"{dtype} {seed:#x} {key} {offset}")


# ------------------------------------------------------------------------------------------------
# Stored values of the passes
# ------------------------------------------------------------------------------------------------

def _pass_cases(backend, device):
    rng = np.random.default_rng(5)
    return _cases(backend, device, rng, 6)


def _run_pass(x, seed, key, offset, kind, dtype, device, backend, rounding, restore):
    """The library's pass on x (in place) and this implementation's (a, b) for it."""
    t = x.clone().to(device)
    if restore:
        eps, lr, g, wd = 1e-3, 0.37, -2.5, 0.125
        F.restore_and_update_([t], seed, eps, lr, g, weight_decay=wd, keys=[key], noise=kind, offsets=[offset],
                              rounding_seed=rounding, backend=backend)
        a = 1.0 - lr * wd                       # the coefficients of restore_and_update_, in float64
        b = a * eps - lr * g
    else:
        a, b = 1.0, -0.0123
        F.perturb_([t], seed, b, keys=[key], noise=kind, offsets=[offset], rounding_seed=rounding, backend=backend)
    return _bits_of(t), a, b


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rounding", [None, 0x8000000000000001], ids=["nearest", "stochastic"])
def test_rademacher_passes_bit_for_bit(backend, device, rounding):
    """perturb_ and restore_and_update_, every dtype, to nearest and stochastically: the stored bits are
    this implementation's, for x of mixed magnitudes (zeros, float16 subnormals, values below 2**-24)."""
    rng = np.random.default_rng(6)
    for seed, key, offset, n in _pass_cases(backend, device):
        z = rademacher(n, seed, key, offset)
        r = None if rounding is None else rounding_draws(n, rounding, key, offset)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = _random_x(n, dtype, rng)
            for restore in (False, True):
                got, a, b = _run_pass(x, seed, key, offset, "rademacher", dtype, device, backend, rounding, restore)
                want = pass_bits(x.float().numpy(), a, b, z, dtype, r)
                _assert_bits_equal(got, want, dtype, f"{dtype} restore={restore} {seed:#x} {key} {offset}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rounding", [None, 0x00000000FFFFFFFF], ids=["nearest", "stochastic"])
def test_gaussian_passes_within_the_tolerance(backend, device, rounding):
    """Every stored value lies between the values this implementation stores for the ends of z's
    tolerance interval (same x, a, b and draws)."""
    rng = np.random.default_rng(7)
    for seed, key, offset, n in _pass_cases(backend, device):
        z_lo, z_hi = tolerance_interval(gaussian(n, seed, key, offset))
        r = None if rounding is None else rounding_draws(n, rounding, key, offset)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = _random_x(n, dtype, rng)
            for restore in (False, True):
                got, a, b = _run_pass(x, seed, key, offset, "gaussian", dtype, device, backend, rounding, restore)
                x32 = x.float().numpy()
                _assert_between(got, pass_bits(x32, a, b, z_lo, dtype, r), pass_bits(x32, a, b, z_hi, dtype, r),
                                dtype, f"{dtype} restore={restore} {seed:#x} {key} {offset}")


# (x, d) of section 8's edge cases: the pass gets alpha = d * z (Rademacher z = +-1), so y = x + d. x = 0: zero,
# float16 subnormals and values below them (q with a fraction, either side of 1 - 2**-9), the bottom of
# float16's normal range, float32 subnormals (bfloat16 subnormals), ties of round to nearest (to even:
# down, then up) in bfloat16, float16 and float16's subnormals. Then the largest finite values of each
# type and beyond (saturate; to nearest: infinity), and non-finite y.
SMALL_Y = [0.0, -6e-8, 2.0**-26, 1e-9, 1000.999 * 2.0**-40, 1.5 * 2.0**-40, (1 - 2.0**-9) * 2.0**-40,
           -(1 - 2.0**-8) * 2.0**-40, 1.337 * 2.0**-17, 1.337 * 2.0**-18, 2.0**-14 * (1 + 2.0**-12), 1e-40,
           1 + 2.0**-8, -1 - 3 * 2.0**-8, 1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-25, -3 * 2.0**-25, 0.33, -1.0]
BF16_MAX = FORMATS[torch.bfloat16][0]
LARGE_X_D = {torch.float32: [(3.0e38, 1e37), (-3.3e38, -2e37)],
             torch.float16: [(65504.0, 8.0), (65504.0, 16.0), (65504.0, 1000.0), (-63000.0, -3000.0),
                             (65504.0, -16.0)],
             torch.bfloat16: [(BF16_MAX, BF16_MAX * 2.0**-9), (BF16_MAX, BF16_MAX * 2.0**-8),
                              (-BF16_MAX, -BF16_MAX * 2.0**-6)]}
NON_FINITE_X = [np.inf, -np.inf, np.nan]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("rounding", [None, 0xFEEDFACECAFEBEEF], ids=["nearest", "stochastic"])
def test_special_values_bit_for_bit(backend, device, rounding):
    """Section 8's edge cases through one perturb_ call over one-element tensors, each with its own key,
    offset, x and alpha."""
    rng = np.random.default_rng(8)
    seed = 17
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        cases = [(0.0, y) for y in SMALL_Y] + LARGE_X_D[dtype] + [(x, 1.0) for x in NON_FINITE_X]
        n = len(cases)
        keys = [int(k) for k in rng.choice(2**32, size=n, replace=False)]
        offsets = [int(o) for o in rng.integers(0, 1 << 62, n)]
        z = [float(rademacher(1, seed, k, o)[0]) for k, o in zip(keys, offsets)]
        alphas = [d * z_i for (_, d), z_i in zip(cases, z)]
        tensors = [torch.tensor([x]).to(dtype).to(device) for x, _ in cases]
        x32 = np.array([float(t.item()) for t in tensors], dtype=np.float32)
        F.perturb_(tensors, seed, alphas, keys=keys, noise="rademacher", offsets=offsets, rounding_seed=rounding,
                   backend=backend)
        got = np.concatenate([_bits_of(t) for t in tensors])
        want = []
        for i, (k, o) in enumerate(zip(keys, offsets)):
            r = None if rounding is None else rounding_draws(1, rounding, k, o)
            want.append(pass_bits(x32[i:i + 1], 1.0, alphas[i], np.float32([z[i]]), dtype, r))
        _assert_bits_equal(got, np.concatenate(want), dtype, str(dtype))
