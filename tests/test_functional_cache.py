"""The functional API's cache of validated plans (fastmezo.plan_cache): it never keeps a tensor alive,
it revalidates a tensor whose storage or layout changed, and a cached call gives the same bits as a
fresh one."""
import gc
import weakref

import pytest
import torch

from fastmezo import functional as F
from fastmezo import plan, plan_cache
from fastmezo.noise import key_from_name, parse_noise
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


def _native_or_skip():
    from fastmezo.backends import native
    if native.load() is None:
        pytest.skip(native.load_error())
    return native.load()


@pytest.fixture(params=["native", "python"])
def state_reader(request, monkeypatch):
    """Each way the cache reads the call and the tensors' state: fastmezo._C's call_state and
    tensor_state, or the Python split and maps."""
    if request.param == "native":
        state, call = plan._readers()
        if state is plan._state_in_python:
            _native_or_skip()
        monkeypatch.setattr(plan, "_read_state", state)
        monkeypatch.setattr(plan, "_read_call", call)
    else:
        monkeypatch.setattr(plan, "_read_state", plan._state_in_python)
        monkeypatch.setattr(plan, "_read_call", plan._no_call_state)
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
@pytest.mark.parametrize("named", [False, True], ids=["list", "named"])
def test_a_tensor_changed_in_place_is_revalidated(mutate, error, named, state_reader):
    weights = _weights(5)
    args = (lambda: [(f"layer.{i}", w) for i, w in enumerate(weights)]) if named else (lambda: weights)
    F.perturb_(args(), 1, 1e-2, backend="oracle")
    F.perturb_(args(), 2, 1e-2, backend="oracle")           # cached
    assert len(plan_cache._entries) == 1
    mutate(weights, weights[1].view(-1))
    before = [w.clone() for w in weights]
    with pytest.raises((ValueError, TypeError), match=error):
        F.perturb_(args(), 3, 1e-2, backend="oracle")
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


def test_a_renamed_tensor_gets_the_noise_of_its_new_name(state_reader):
    """keys="name": the names are part of the call, so a cached plan is never reused under other names."""
    weights, twins = _weights(8), _weights(8)
    names = ["model.a.weight", "model.b.weight", "model.c.weight"]
    for _ in range(2):                                       # a miss, then a hit
        F.perturb_(list(zip(names, weights)), 1, 1e-2, keys="name", backend="oracle")
    renamed = ["model.a.weight", "model.x.weight", "model.c.weight"]
    F.perturb_(list(zip(renamed, weights)), 2, 1e-2, keys="name", backend="oracle")
    for t, old, new in zip(twins, names, renamed):
        t += 1e-2 * z_like(t, 1, key_from_name(old))
        t += 1e-2 * z_like(t, 1, key_from_name(old))
        t += 1e-2 * z_like(t, 2, key_from_name(new))
    for w, t in zip(weights, twins):
        torch.testing.assert_close(w, t, rtol=0, atol=1e-6)
    assert len(plan_cache._entries) == 2


def test_call_state_splits_and_fingerprints_the_fast_cases():
    """fastmezo._C.call_state: the tensors and names of a list (or tuple) of plain tensors or of (name,
    tensor) tuples, as the Python split gives them, and a fingerprint that is equal for the same call
    (new list and name objects included) and differs when any tensor, its state, a name or the order
    differs; None for every other argument."""
    _native_or_skip()
    from fastmezo.plan import _readers
    state, call = _readers()
    a, b = torch.randn(4, 6), torch.nn.Parameter(torch.randn(5))
    names = ["enc.a", "dec.b"]

    def named(ns=names, ts=(a, b)):
        return [("".join(n), t) for n, t in zip(ns, ts)]    # fresh string objects every call

    for items in ([a, b], (a, b), named(), tuple(named())):
        got, got_names, fingerprint, digest = call(items)
        assert got[0] is a and got[1] is b and type(got) is list
        assert got_names == (None if type(items[0]) is not tuple else names)
        again = call(type(items)(list(items)) if type(items[0]) is not tuple else named())
        assert again[2] == fingerprint and again[3] == digest
    first = call(named())[2]
    changed = [named(["enc.a", "dec.c"]), named(ts=(b, a)), named(ts=(a.view(4, 6), b)),
               [(n, t) for n, t in reversed(named())], named(["enc.a", "dec.bb"])]
    prints = {call(c)[2] for c in changed}
    assert first not in prints and len(prints) == len(changed)
    assert call([a, b])[2] != first
    mutations = (lambda: a.resize_(24), lambda: a.as_strided_((4, 6), (1, 4)),
                 lambda: setattr(b, "data", b.data.double()))
    for mutate in mutations:
        before = call(named())[2]
        mutate()
        assert call(named())[2] != before
    class Sub(torch.Tensor):
        pass
    for other in ([], [a, ("n", b)], [a.as_subclass(Sub)], [("n", a, 1)], [(1, a)], [("n", 3)], [3], {"n": a}, a,
                  iter([a]), [["n", a]], [("\udc80", a)]):
        assert call(other) is None, other


def test_a_change_of_keys_offsets_or_noise_is_a_new_plan():
    weights, twins = _weights(7), _weights(7)
    F.perturb_(weights, 1, 1e-2, backend="oracle")
    F.perturb_(weights, 1, 1e-2, keys=[7, 8, 9], offsets=[0, 3, 5], noise="rademacher", backend="oracle")
    F.perturb_(twins, 1, 1e-2, backend="oracle")
    for i, (w, t) in enumerate(zip(weights, twins)):
        want = t + 1e-2 * z_like(t, 1, [7, 8, 9][i], noise="rademacher", offset=[0, 3, 5][i])
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
