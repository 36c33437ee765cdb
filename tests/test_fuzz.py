"""Property-based fuzzing of the fused pass (hypothesis): every call either raises a clear error with
every tensor untouched, or stores what fastmezo.oracle stores.

One example is one call of fastmezo.functional.scale_and_add_noise_ on 1 to 3 tensors, each a
contiguous slice of a larger buffer (so the elements around it must stay untouched), drawn over: dtypes
(float32, float16, bfloat16, and float64 / int32, refused), shapes (empty, 1, odd sizes, 2-D), a
non-contiguous view (refused), two tensors over overlapping memory (refused) or disjoint parts of one
buffer (fine), seeds over all of [0, 2**64) (>= 2**63 included), keys (a repeated key is refused),
offsets up to 2**62 - 1 (2**62 refused), coefficients from small to overflowing (refused), Gaussian or
Rademacher z, rounding to nearest or stochastic.

What must match (docs/noise.md section 3): Rademacher passes and every rounding draw bit for bit;
Gaussian passes between what the oracle stores for the smallest and the largest float32 z' within
1e-5 (1 + |z|) of its z.
"""
import math

import pytest
import torch

from hypothesis import HealthCheck, event, given, settings, strategies as st

from fastmezo import functional as F
from fastmezo import oracle as R

from conftest import HAS_CUDA, HAS_NATIVE, HAS_TRITON

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = 1e-5          # docs/noise.md section 3: |z - z_ref| <= TOLERANCE * (1 + |z_ref|)
OFFSET_LIMIT = 1 << 62
HUGE = [1e38, -3e38, 1e39]                     # |b| * max|z| beyond half of float32's largest: refused
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _store(x, a, b, z, r):
    """The oracle's stored value for a given z (pass_with_z)."""
    return R.pass_with_z(x, a, b, z, r)


def _interval(z_ref):
    z = z_ref.double()
    tol = TOLERANCE * (1 + z.abs())
    lo, hi = (z - tol).float(), (z + tol).float()
    lo = torch.where(lo.double() < z - tol, torch.nextafter(lo, torch.tensor(math.inf)), lo)
    hi = torch.where(hi.double() > z + tol, torch.nextafter(hi, torch.tensor(-math.inf)), hi)
    return lo, hi


@st.composite
def calls(draw, interpreted):
    n = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(DTYPES + ([torch.float64, torch.int32] if draw(st.integers(0, 15)) == 0 else [])))
    sizes = st.sampled_from([0, 1, 3, 7, 64, 129, 255] if interpreted else [0, 1, 3, 7, 64, 129, 255, 1000, 4099])
    shapes = [draw(st.one_of(sizes.map(lambda k: (k,)), st.tuples(st.integers(1, 9), st.integers(1, 17))))
              for _ in range(n)]
    layout = draw(st.sampled_from(["apart"] * 6 + ["non-contiguous", "overlapping", "one buffer"]))
    seed = draw(st.one_of(st.integers(0, (1 << 64) - 1), st.sampled_from([1 << 63, (1 << 64) - 1, 0])))
    keys = draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=n, max_size=n, unique=True))
    if n > 1 and draw(st.integers(0, 9)) == 0:
        keys[-1] = keys[0]
    offsets = [draw(st.one_of(st.integers(0, 1 << 40), st.integers(OFFSET_LIMIT - 5000, OFFSET_LIMIT - 1),
                              st.just(OFFSET_LIMIT) if draw(st.integers(0, 15)) == 0 else st.just(0)))
               for _ in range(n)]
    a = draw(st.floats(-2, 2, allow_nan=False))
    b = draw(st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from(HUGE + [1e4, -7e3])))
    noise = draw(st.sampled_from(["gaussian", "rademacher"]))
    round_seed = draw(st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
    return dict(dtype=dtype, shapes=shapes, layout=layout, seed=seed, keys=keys, offsets=offsets, a=a, b=b,
                noise=noise, round_seed=round_seed, data_seed=draw(st.integers(0, 1 << 30)))


def _tensors(case):
    """(buffers, tensors): each tensor a contiguous slice at some storage offset of a larger buffer;
    the layout may make one non-contiguous, two overlap, or two share one buffer without overlapping."""
    g = torch.Generator().manual_seed(case["data_seed"])
    dtype, layout = case["dtype"], case["layout"]
    numels = [math.prod(s) for s in case["shapes"]]
    buffers, tensors = [], []
    for i, (shape, k) in enumerate(zip(case["shapes"], numels)):
        buf = (torch.randn(2 * k + 8, generator=g) * 3).to(dtype)
        start = int(torch.randint(0, 8, (1,), generator=g))
        t = buf[start:start + k].view(shape)
        if layout == "non-contiguous" and i == 0 and len(shape) == 2 and min(shape) > 1:
            t = buf[:k].view(shape[::-1]).t()
        buffers.append(buf)
        tensors.append(t)
    if len(tensors) > 1 and numels[0] and numels[1] and layout in ("overlapping", "one buffer"):
        buf = buffers[0]
        begin = tensors[0].storage_offset() + (numels[0] - 1 if layout == "overlapping" else numels[0])
        big = torch.cat([buf, (torch.randn(numels[1] + 8, generator=g) * 3).to(dtype)])
        buffers[0] = big
        tensors[0] = big[tensors[0].storage_offset():tensors[0].storage_offset() + numels[0]].view(case["shapes"][0])
        tensors[1] = big[begin:begin + numels[1]].view(case["shapes"][1])
    return buffers, tensors


def _must_refuse(case, tensors):
    """The reason a call must be refused, or None (the checks of docs/noise.md and fastmezo.checks)."""
    if case["dtype"] not in DTYPES:
        return "dtype"
    if not all(t.is_contiguous() for t in tensors):
        return "non-contiguous"
    live = [t for t in tensors if t.numel()]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in live)
    if any(s[0] < p[1] for p, s in zip(spans, spans[1:])):
        return "overlap"
    if len(set(case["keys"])) != len(case["keys"]):
        return "repeated key"
    if any(o >= OFFSET_LIMIT for o in case["offsets"]):
        return "offset"
    limit = torch.finfo(case["dtype"]).max / 2 / 5.8
    if abs(case["b"]) > limit and live:          # empty tensors alone: no pass runs, nothing can overflow
        return "overflow"
    return None


def _check(case, backend, interpreted):
    buffers, tensors = _tensors(case)
    before = [b.clone() for b in buffers]
    reason = _must_refuse(case, tensors)
    event(f"refused: {reason}" if reason else f"stored: {case['noise']}, {case['dtype']}")
    try:
        F.scale_and_add_noise_(tensors, case["a"], case["b"], case["seed"], keys=case["keys"], noise=case["noise"],
                               offsets=case["offsets"], rounding_seed=case["round_seed"], backend=backend)
    except (TypeError, ValueError, OverflowError) as exc:
        assert reason is not None, f"refused a valid call: {exc}"
        assert len(str(exc)) > 20
        assert all(torch.equal(b, c) for b, c in zip(buffers, before)), "a refused call changed a tensor"
        return
    assert reason is None, f"accepted a call it must refuse ({reason})"
    # Every element outside the tensors is untouched; each tensor is what the oracle stores.
    inside = [torch.zeros(b.numel(), dtype=torch.bool) for b in buffers]
    for t in tensors:
        for i, b in enumerate(buffers):
            if t.numel() and t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                inside[i][t.storage_offset():t.storage_offset() + t.numel()] = True
    for b, c, m in zip(buffers, before, inside):
        assert torch.equal(b[~m], c[~m]), "an element outside the tensors changed"
    old = {id(t): c[t.storage_offset():t.storage_offset() + t.numel()]
           for t in tensors for b, c in zip(buffers, before)
           if t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()}
    for t, key, offset in zip(tensors, case["keys"], case["offsets"]):
        if not t.numel():
            continue
        x = old[id(t)]
        index = torch.arange(offset, offset + x.numel(), dtype=torch.int64)
        z = R.noise_at(index, case["seed"], key, case["noise"])
        r = None if case["round_seed"] is None else R.rounding_bits_at(index, case["round_seed"], key)
        got = t.reshape(-1).float()
        if case["noise"] == "rademacher":
            want = _store(x, case["a"], case["b"], z, r).float()
            assert torch.equal(got, want), (got - want).abs().max()
        else:
            lo, hi = (_store(x, case["a"], case["b"], zz, r).float() for zz in _interval(z))
            lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
            assert bool(((got >= lo) & (got <= hi)).all()), "a Gaussian store outside the tolerance"


FUZZ = dict(deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=200, **FUZZ)
@given(calls(interpreted=False))
def test_oracle_backend(case):
    _check(case, "oracle", False)


@pytest.mark.skipif(not HAS_NATIVE, reason="fastmezo._C is not built")
@settings(max_examples=300, **FUZZ)
@given(calls(interpreted=False))
def test_native_backend(case):
    _check(case, "native", False)


@pytest.mark.skipif(not HAS_TRITON or HAS_CUDA, reason="the Triton interpreter runs CPU tensors only")
@settings(max_examples=60, **FUZZ)
@given(calls(interpreted=True))
def test_triton_interpreter(case):
    _check(case, "triton", True)
