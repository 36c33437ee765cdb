"""The functional API's cache of validated plans (fastmezo.plan_cache): it never keeps a tensor alive,
it revalidates a tensor whose storage or layout changed, and a cached call gives the same bits as a
fresh one."""
import gc
import weakref

import pytest
import torch

from fastmezo import functional as F
from fastmezo import plan, plan_cache
from fastmezo.noise import parse_noise
from fastmezo.oracle import noise as oracle_noise, pass_with_z

BACKENDS = ["oracle", "native", "triton"]


def _backend_or_skip(name):
    from fastmezo import backends
    reason = backends.by_name(name).unavailable_reason(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    return name


def z_like(t, seed, key, noise="gaussian", offset=0):
    return oracle_noise(t.numel(), seed, key, parse_noise(noise), offset).view(t.shape)


def _weights(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((33,), (4, 5), (17,))]


@pytest.fixture(autouse=True)
def _empty_cache():
    plan_cache.clear()
    yield
    plan_cache.clear()


@pytest.fixture(params=["native", "python"])
def state_reader(request, monkeypatch):
    """Each way the cache reads the tensors' state: fastmezo._C's tensor_state, or the Python maps."""
    if request.param == "native":
        from fastmezo.backends import native
        if native.load() is None:
            pytest.skip(native.load_error())
        monkeypatch.setattr(plan, "_read_state", native.load().tensor_state)
    else:
        monkeypatch.setattr(plan, "_read_state", plan._state_in_python)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_calls_give_the_bits_of_uncached_calls(backend, monkeypatch):
    backend = _backend_or_skip(backend)
    cached, fresh = _weights(1, torch.float16), _weights(1, torch.float16)
    for step in range(3):           # the first call builds the plan, the others reuse it
        F.perturb_(cached, 10 + step, 1e-2, backend=backend, rounding_seed=step)
        F.restore_and_update_(cached, 10 + step, 1e-2, 1e-3, 0.5, weight_decay=0.1, backend=backend)
    assert len(plan_cache._entries) == 1
    monkeypatch.setattr(plan_cache, "_key", lambda *args: None)      # no cache at all
    for step in range(3):
        F.perturb_(fresh, 10 + step, 1e-2, backend=backend, rounding_seed=step)
        F.restore_and_update_(fresh, 10 + step, 1e-2, 1e-3, 0.5, weight_decay=0.1, backend=backend)
    for c, f in zip(cached, fresh):
        assert torch.equal(c, f)


def test_a_cached_call_still_moves_the_weights_by_z():
    # float32, oracle backend: the pass x + alpha z is the oracle's to within float32 rounding.
    weights = _weights(2)
    start = [w.clone() for w in weights]
    F.perturb_(weights, 5, 1e-2, backend="oracle")
    F.perturb_(weights, 6, 1e-2, backend="oracle")          # a hit
    for i, (w, s) in enumerate(zip(weights, start)):
        want = pass_with_z(pass_with_z(s, 1.0, 1e-2, z_like(s, 5, i)), 1.0, 1e-2, z_like(s, 6, i))
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
        assert not torch.equal(w, s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_cache_never_keeps_a_tensor_alive(backend):
    backend = _backend_or_skip(backend)
    weights = _weights(3)
    for _ in range(2):                                       # a miss, then a hit
        F.perturb_(weights, 1, 1e-2, backend=backend)
    refs = [weakref.ref(w) for w in weights]
    del weights
    assert all(r() is None for r in refs)                    # by reference counting, no collection needed
    assert not plan_cache._entries                           # and the entry went with them


def test_dropping_one_tensor_drops_the_entry_and_a_new_list_is_validated():
    weights = _weights(4)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    gone = weakref.ref(weights[1])
    weights[1] = torch.randn(4, 5)
    gc.collect()
    assert gone() is None and not plan_cache._entries
    weights[1] = weights[0]                                  # the same tensor twice must be refused again
    with pytest.raises(ValueError, match="overlaps the memory"):
        F.perturb_(weights, 1, 1e-2, backend="oracle")


@pytest.mark.parametrize("mutate, error", [
    (lambda w, other: w[0].set_(other[:33]), "overlaps the memory"),              # aliases tensor 1 now
    (lambda w, other: w[1].as_strided_((4, 5), (1, 4)), "not contiguous"),      # same address and shape
    (lambda w, other: w[2].resize_(4, 5).as_strided_((4, 5), (1, 4)), "not contiguous"),
    (lambda w, other: setattr(w[0], "data", w[0].data.to(torch.int32)), "dtype torch.int32"),
    (lambda w, other: setattr(w[0], "data", w[0].data.view(torch.int32)), "dtype torch.int32"),  # same address
])
def test_a_tensor_changed_in_place_is_revalidated(mutate, error, state_reader):
    weights = _weights(5)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    F.perturb_(weights, 2, 1e-2, backend="oracle")          # cached
    mutate(weights, weights[1].view(-1))
    before = [w.clone() for w in weights]
    with pytest.raises((ValueError, TypeError), match=error):
        F.perturb_(weights, 3, 1e-2, backend="oracle")
    for w, b in zip(weights, before):                        # refused before anything moved
        assert torch.equal(w, b)


def test_a_tensor_shrunk_in_place_gets_the_noise_of_its_new_size(state_reader):
    weights = _weights(7)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    address = weights[0].data_ptr()
    weights[0].resize_(10)                                   # same address and dtype, a new shape
    assert weights[0].data_ptr() == address
    start = weights[0].clone()
    F.perturb_(weights, 2, 1e-2, backend="oracle")
    torch.testing.assert_close(weights[0], start + 1e-2 * z_like(start, 2, 0), rtol=0, atol=1e-6)


def test_the_native_state_tells_every_property_apart():
    from fastmezo.backends import native
    if native.load() is None:
        pytest.skip(native.load_error())
    state = native.load().tensor_state
    base = torch.randn(4, 6)
    same_address = [base.view(torch.int32), base.view(6, 4), base.as_strided((4, 6), (1, 4)), base.view(-1)]
    assert len({state([t]) for t in [base] + same_address}) == 5
    assert state([base, base[1:]]) != state([base[1:], base])
    assert state([base]) == state([base.view(4, 6)])          # a new tensor object with the same state
    assert state([torch.empty(3, device="meta")]) == state([torch.empty(3, device="meta")])


def test_a_resized_tensor_gets_the_noise_of_its_new_size(state_reader):
    weights = _weights(6)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    weights[0].resize_(50).copy_(torch.linspace(-1, 1, 50))  # new shape (and likely a new address)
    start = weights[0].clone()
    F.perturb_(weights, 2, 1e-2, backend="oracle")
    torch.testing.assert_close(weights[0], start + 1e-2 * z_like(start, 2, 0), rtol=0, atol=1e-6)


def test_a_change_of_keys_offsets_or_noise_is_a_new_plan():
    weights, twins = _weights(7), _weights(7)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    F.perturb_(weights, 1, 1e-2, keys=[7, 8, 9], offsets=[0, 3, 5], noise="rademacher", backend="oracle")
    F.perturb_(twins, 1, 1e-2, backend="oracle")
    for i, (w, t) in enumerate(zip(weights, twins)):
        want = t + 1e-2 * z_like(t, 1, [7, 8, 9][i], noise="rademacher", offset=[0, 3, 5][i])
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
