"""Bad input: every entry point raises a clear error naming the problem, and no tensor changes.

Bad tensors are put last in a list after valid float32 / float16 / bfloat16 tensors, so a function
that modified tensors before validating would be caught (every tensor is compared with torch.equal
to a clone taken before the call).
"""
import math
import os

import pytest
import torch

import fastmezo
from fastmezo import functional as F

from conftest import HAS_CUDA


@pytest.fixture(autouse=True)
def _automatic_backend(monkeypatch):
    """These tests set FASTMEZO_BACKEND themselves where they need it."""
    monkeypatch.delenv("FASTMEZO_BACKEND", raising=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _goods():
    """Valid tensors with values k / 32, |k| <= 32: with Rademacher z and eps = 1/8, the +eps, -2 eps,
    +eps passes of a MeZO step are exact in every dtype, so a restored step is bit-identical too."""
    return [(torch.randint(-32, 33, shape, generator=_gen(i)).float() / 32).to(dtype)
            for i, (shape, dtype) in enumerate([((4, 5), torch.float32), ((7,), torch.float16),
                                                ((3, 2), torch.bfloat16)])]


EPS = 2.0 ** -3


def _other_device_tensor():
    """A float32 tensor on another device than the CPU: CUDA if present; else a fake CUDA tensor
    (torch's FakeTensor reports device cuda:0 without a GPU; it has no data, so any attempt to run
    on it fails loudly)."""
    if HAS_CUDA:
        return torch.randn(3, device="cuda")
    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    with fake.FakeTensorMode(allow_non_fake_inputs=True):
        return torch.empty(3, device="cuda")


def _bad(kind, goods):
    """(bad tensor, exception, message pattern) for each kind of bad tensor."""
    if kind == "int64":
        return torch.arange(6), TypeError, r"tensor 3 has dtype torch\.int64.*float32, float16 or bfloat16"
    if kind == "float64":
        return torch.randn(5, dtype=torch.float64), TypeError, r"tensor 3 has dtype torch\.float64"
    if kind == "non-contiguous":
        t = torch.randn(4, 3).t()
        assert not t.is_contiguous()
        return t, ValueError, r"tensor 3 .*not contiguous"
    if kind == "meta":
        return torch.empty(3, device="meta"), ValueError, r"tensor 3 is a meta tensor"
    if kind == "other device":
        return _other_device_tensor(), ValueError, r"tensor 3 is on cuda.* tensor 0 is on cpu"
    if kind == "same tensor twice":
        return goods[0], ValueError, r"tensor 3 overlaps the memory of tensor 0"
    raise AssertionError(kind)


BAD_TENSORS = ["int64", "float64", "non-contiguous", "meta", "other device", "same tensor twice"]


def _assert_untouched(tensors, clones):
    for i, (t, c) in enumerate(zip(tensors, clones)):
        if t.is_meta or t.device.type != c.device.type or type(t) is not torch.Tensor:
            continue  # meta / fake tensors have no data to compare
        assert torch.equal(t, c), f"tensor {i} changed"


def _clone_all(tensors):
    return [t if (t.is_meta or type(t) is not torch.Tensor) else t.clone() for t in tensors]


# ----------------------------------------------------------------------------------------------
# bad tensors
# ----------------------------------------------------------------------------------------------

def _perturb(tensors, **kw):
    F.perturb_(tensors, kw.pop("seed", 1), kw.pop("alpha", 1e-2), **kw)


def _restore(tensors, **kw):
    args = dict(seed=1, eps=1e-2, lr=1e-2, projected_grad=0.5, weight_decay=0.1)
    args.update(kw)
    F.restore_and_update_(tensors, args.pop("seed"), args.pop("eps"), args.pop("lr"),
                          args.pop("projected_grad"), **args)


FUNCTIONS = {"perturb_": _perturb, "restore_and_update_": _restore}


@pytest.mark.parametrize("kind", BAD_TENSORS)
@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
def test_functional_rejects_bad_tensors(fn, kind):
    goods = _goods()
    bad, exc, match = _bad(kind, goods)
    tensors = goods + [bad]
    clones = _clone_all(tensors)
    with pytest.raises(exc, match=match):
        FUNCTIONS[fn](tensors)
    _assert_untouched(tensors, clones)


def test_functional_names_the_parameter():
    # (name, tensor) pairs: the message names the offending parameter.
    goods = _goods()
    named = [("encoder.weight", goods[0]), ("head.weight", torch.zeros(2, 2, dtype=torch.float64))]
    with pytest.raises(TypeError, match=r"tensor 1 \('head\.weight'\) has dtype torch\.float64"):
        F.perturb_(named, 1, 1e-2)
    assert torch.equal(goods[0], _goods()[0])


@pytest.mark.parametrize("kind", [k for k in BAD_TENSORS if k != "other device"])
def test_mezo_step_rejects_bad_tensors(kind):
    """MeZO.step validates every parameter before the first pass (and before calling the closure).
    Tensors on several devices are allowed there (grouped per device), so that case is not an error."""
    goods = _goods()
    bad, exc, match = _bad(kind, goods)
    if kind == "same tensor twice":
        bad = goods[0].view(goods[0].shape)  # a tied weight: another tensor over the same storage
    tensors = goods + [bad]
    clones = _clone_all(tensors)
    opt = fastmezo.MeZO(tensors, lr=1e-2, eps=1e-2)
    calls = []
    with pytest.raises(exc, match=match):
        opt.step(lambda: calls.append(1) or 1.0)
    assert calls == []
    _assert_untouched(tensors, clones)
    assert opt.step_count == 0


# ----------------------------------------------------------------------------------------------
# bad numbers, names and options in the functional API
# ----------------------------------------------------------------------------------------------

COMMON_CASES = [
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
    (dict(seed=2 ** 64), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=1.5), TypeError, r"seed must be an int.*float"),
    (dict(seed=True), TypeError, r"seed must be an int.*bool"),
    (dict(noise="uniform"), ValueError, r"unknown noise distribution 'uniform'.*'gaussian', 'rademacher'"),
    (dict(noise=7), ValueError, r"unknown noise distribution 7"),
    (dict(keys=[0]), ValueError, r"got 1 keys for 3 tensors"),
    (dict(keys=[5, 5, 6]), ValueError, r"keys must be distinct \(key 5 repeats\)"),
    (dict(keys=[0, 1, 2 ** 32]), ValueError, r"key 2 must be an int in \[0, 2\*\*32\)"),
    (dict(keys=[0, 1, -1]), ValueError, r"key 2 must be an int in \[0, 2\*\*32\)"),
    (dict(keys="position"), ValueError, r"keys must be a sequence of ints, 'index' or 'name'"),
    (dict(keys="name"), ValueError, r"keys='name' needs \(name, tensor\) pairs"),
    (dict(offsets=[0, -1, 0]), ValueError, r"offsets must be 3 ints"),
    (dict(backend="cuda"), ValueError, r"unknown fastmezo backend 'cuda'"),
]

PERTURB_CASES = [
    (dict(alpha=math.nan), ValueError, r"alpha must be finite"),
    (dict(alpha=math.inf), ValueError, r"alpha must be finite"),
    (dict(alpha=[1e-2, 1e-2]), ValueError, r"got 2 values of alpha for 3 tensors"),
    (dict(alpha="big"), TypeError, r"alpha must be a real number, got str"),
    (dict(alpha="1e-3"), TypeError, r"alpha must be a real number, got str '1e-3'"),
    (dict(alpha=True), TypeError, r"alpha must be a real number, got bool"),
    (dict(alpha=None), TypeError, r"alpha must be a real number, got NoneType"),
]

RESTORE_CASES = [
    (dict(eps=0.0), ValueError, r"eps must be a finite number > 0, got 0\.0"),
    (dict(eps=-1e-3), ValueError, r"eps must be a finite number > 0"),
    (dict(eps=[1e-2, 0.0, 1e-2]), ValueError, r"eps must be a finite number > 0"),
    (dict(eps=math.nan), ValueError, r"eps must be finite"),
    (dict(eps=math.inf), ValueError, r"eps must be finite"),
    (dict(lr=math.nan), ValueError, r"lr must be finite"),
    (dict(projected_grad=math.inf), ValueError, r"projected_grad must be finite"),
    (dict(projected_grad=torch.ones(2)), TypeError, r"projected_grad must be a real number, got a torch.float32 tensor of shape \(2,\)"),
    (dict(weight_decay=math.nan), ValueError, r"weight_decay must be finite"),
    (dict(lr="1e-3"), TypeError, r"lr must be a real number, got str '1e-3'"),
    (dict(lr=-1e-3), ValueError, r"lr must be >= 0"),
    (dict(eps="1e-3"), TypeError, r"eps must be a real number, got str"),
    (dict(projected_grad=None), TypeError, r"projected_grad must be a real number, got NoneType"),
    (dict(weight_decay=False), TypeError, r"weight_decay must be a real number, got bool"),
]


def _case_id(case):
    return ",".join(f"{k}={v!r}" for k, v in case[0].items())[:40]


@pytest.mark.parametrize("case", COMMON_CASES + PERTURB_CASES, ids=_case_id)
def test_perturb_rejects_bad_arguments(case):
    kwargs, exc, match = case
    tensors = _goods()
    clones = _clone_all(tensors)
    with pytest.raises(exc, match=match):
        _perturb(tensors, **kwargs)
    _assert_untouched(tensors, clones)


@pytest.mark.parametrize("case", COMMON_CASES + RESTORE_CASES, ids=_case_id)
def test_restore_and_update_rejects_bad_arguments(case):
    kwargs, exc, match = case
    tensors = _goods()
    clones = _clone_all(tensors)
    with pytest.raises(exc, match=match):
        _restore(tensors, **kwargs)
    _assert_untouched(tensors, clones)


def test_other_entry_points_reject_bad_arguments():
    with pytest.raises(ValueError, match="numel must be a non-negative int"):
        F.make_noise(-1, 0)
    with pytest.raises(TypeError, match=r"tensor 1 is a str, not a torch\.Tensor"):
        F.perturb_([torch.zeros(2), "weight"], 1, 1e-2)
    x = _goods()[0]
    clone = x.clone()
    with pytest.raises(ValueError, match="got 2 values of b"):
        F.scale_and_add_noise_([x], 1.0, [1.0, 2.0], 0)
    assert torch.equal(x, clone)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------

def _native_missing(monkeypatch):
    """Make the native backend unavailable (as where fastmezo._C is not built), whatever this build has:
    the tests below are about an explicitly requested backend that cannot run."""
    monkeypatch.setattr(fastmezo.backends.native, "unavailable_reason", lambda device: (
        "fastmezo was installed without its native library fastmezo._C (simulated by the test)"))


@pytest.mark.parametrize("fn", sorted(FUNCTIONS))
def test_functional_backend_env(fn, monkeypatch):
    _native_missing(monkeypatch)
    tensors = _goods()
    clones = _clone_all(tensors)
    monkeypatch.setenv("FASTMEZO_BACKEND", "native")
    with pytest.raises(fastmezo.BackendUnavailable, match=r"backend 'native' cannot run cpu tensors.*native library"):
        FUNCTIONS[fn](tensors)
    _assert_untouched(tensors, clones)
    monkeypatch.setenv("FASTMEZO_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match=r"unknown fastmezo backend 'warp-drive' \(from FASTMEZO_BACKEND\)"):
        FUNCTIONS[fn](tensors)
    _assert_untouched(tensors, clones)
    monkeypatch.delenv("FASTMEZO_BACKEND")
    with pytest.raises(fastmezo.BackendUnavailable, match="native library"):
        FUNCTIONS[fn](tensors, backend="native")
    _assert_untouched(tensors, clones)
    FUNCTIONS[fn](tensors)  # and the automatic choice runs
    assert not torch.equal(tensors[0], clones[0])


def test_mezo_backend_env_and_argument(monkeypatch):
    _native_missing(monkeypatch)
    tensors = _goods()
    clones = _clone_all(tensors)
    calls = []
    closure = lambda: calls.append(1) or 1.0  # noqa: E731
    monkeypatch.setenv("FASTMEZO_BACKEND", "native")
    opt = fastmezo.MeZO(tensors, lr=1e-2, eps=1e-2)
    with pytest.raises(fastmezo.BackendUnavailable, match="native library"):
        opt.step(closure)
    monkeypatch.delenv("FASTMEZO_BACKEND")
    with pytest.raises(fastmezo.BackendUnavailable, match="native library"):
        fastmezo.MeZO(tensors, backend="native").step(closure)
    monkeypatch.setenv("FASTMEZO_BACKEND", "warp-drive")
    with pytest.raises(ValueError, match=r"unknown fastmezo backend 'warp-drive' \(from FASTMEZO_BACKEND\)"):
        opt.step(closure)
    assert calls == [] and opt.step_count == 0
    _assert_untouched(tensors, clones)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device next to the CPU")
def test_mezo_backend_unavailable_on_second_device_leaves_first_untouched():
    # Triton runs CPU tensors only under TRITON_INTERPRET, which conftest leaves off on a GPU machine.
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    tensors = [torch.randn(5, device="cuda"), torch.randn(4)]
    clones = [t.clone() for t in tensors]
    opt = fastmezo.MeZO(tensors, lr=1e-2, eps=1e-2, backend="triton")
    with pytest.raises(fastmezo.BackendUnavailable, match="TRITON_INTERPRET"):
        opt.step(lambda: 1.0)
    for t, c in zip(tensors, clones):
        assert torch.equal(t, c)


# ----------------------------------------------------------------------------------------------
# MeZO: constructor, param groups changed later, closures
# ----------------------------------------------------------------------------------------------

CONSTRUCTOR_CASES = [
    (dict(eps=0.0), r"eps must be a finite number > 0, got 0\.0"),
    (dict(eps=-1e-3), r"eps must be a finite number > 0"),
    (dict(eps=math.nan), r"eps must be a finite number > 0, got nan"),
    (dict(eps=math.inf), r"eps must be a finite number > 0, got inf"),
    (dict(lr=math.nan), r"lr must be finite"),
    (dict(weight_decay=math.inf), r"weight_decay must be finite"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=2 ** 64), r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=1.0), r"seed must be an int.*float"),
    (dict(noise="uniform"), r"unknown noise distribution 'uniform'"),
    (dict(keys="position"), r"keys must be one of 'auto', 'name', 'index', got 'position'"),
    (dict(on_nonfinite="ignore"), r"on_nonfinite must be 'skip' or 'raise', got 'ignore'"),
    (dict(backend="fast"), r"unknown fastmezo backend 'fast'"),
]


# Options as a YAML config gives them ("1e-3"), bools, None, a negative lr: refused before any pass.
TYPED_OPTION_CASES = [
    (dict(lr="1e-3"), TypeError, r"lr( of param group \d)? must be a real number, got str '1e-3'"),
    (dict(eps="1e-3"), TypeError, r"eps( of param group \d)? must be a real number, got str '1e-3'"),
    (dict(weight_decay="0.1"), TypeError, r"weight_decay( of param group \d)? must be a real number, got str '0\.1'"),
    (dict(lr=True), TypeError, r"lr( of param group \d)? must be a real number, got bool"),
    (dict(eps=None), TypeError, r"eps( of param group \d)? must be a real number, got NoneType"),
    (dict(lr=None), TypeError, r"lr( of param group \d)? must be a real number, got NoneType"),
    (dict(lr=-1e-3), ValueError, r"lr( of param group \d)? must be >= 0, got -0\.001"),
    (dict(weight_decay=-0.1), ValueError, r"weight_decay( of param group \d)? must be >= 0"),
    (dict(eps=5e-324), ValueError, r"eps( of param group \d)? must be a finite number > 0, got 5e-324 \(at least 1\.18e-38"),
]


@pytest.mark.parametrize("case", TYPED_OPTION_CASES, ids=_case_id)
@pytest.mark.parametrize("entry", ["MeZO", "patch", "param group"])
def test_options_that_are_not_real_numbers_are_refused_before_any_pass(case, entry):
    kwargs, exc, match = case
    goods = _goods()
    clones = _clone_all(goods)
    calls = []
    with pytest.raises(exc, match=match):
        if entry == "MeZO":
            fastmezo.MeZO(goods, **kwargs)
        elif entry == "patch":
            # patch puts weight_decay into its param groups: refused there at the first step, before
            # the first pass (a forward that runs would append to calls)
            model = torch.nn.Linear(2, 2)
            before = _clone_all(list(model.parameters()))
            try:
                fastmezo.patch(model, **kwargs).step(lambda: calls.append(1) or model.weight.sum())
            finally:
                _assert_untouched(list(model.parameters()), before)
        else:
            opt = fastmezo.MeZO([dict(params=goods[:1]), dict(params=goods[1:])], lr=1e-2, eps=1e-2)
            (key, value), = kwargs.items()
            opt.param_groups[1][key] = value
            opt.step(lambda: calls.append(1) or 1.0)
    assert calls == []
    _assert_untouched(goods, clones)


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=_case_id)
def test_mezo_constructor_rejects_bad_options(case):
    kwargs, match = case
    exc = TypeError if isinstance(kwargs.get("seed"), float) else ValueError
    with pytest.raises(exc, match=match):
        fastmezo.MeZO(_goods(), **kwargs)


@pytest.mark.parametrize("key,value,match", [
    ("eps", 0.0, r"eps of param group 1 must be a finite number > 0, got 0\.0"),
    ("eps", -1e-2, r"eps of param group 1 must be a finite number > 0"),
    ("eps", math.nan, r"eps of param group 1 must be a finite number > 0"),
    ("eps", math.inf, r"eps of param group 1 must be a finite number > 0"),
    ("lr", math.nan, r"lr of param group 1 must be finite"),
    ("weight_decay", math.inf, r"weight_decay of param group 1 must be finite"),
])
def test_mezo_step_rejects_param_group_changed_after_construction(key, value, match):
    goods = _goods()
    clones = _clone_all(goods)
    opt = fastmezo.MeZO([dict(params=goods[:1]), dict(params=goods[1:])], lr=1e-2, eps=1e-2)
    opt.param_groups[1][key] = value
    calls = []
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: calls.append(1) or 1.0)
    assert calls == [] and opt.step_count == 0
    _assert_untouched(goods, clones)


@pytest.mark.parametrize("result,exc,match", [
    (lambda ts: torch.stack([t.float().sum() for t in ts]), ValueError, r"scalar loss.*shape \(3,\)"),
    (lambda ts: ts[0].sum(0), ValueError, r"scalar loss.*shape \(5,\)"),
    (lambda ts: torch.zeros(0), ValueError, r"scalar loss.*shape \(0,\)"),
    (lambda ts: [1.0], TypeError, r"as a number or a scalar tensor.*list"),
    (lambda ts: "0.5", TypeError, r"as a number or a scalar tensor.*str"),
    (lambda ts: None, TypeError, r"as a number or a scalar tensor.*NoneType"),
    (lambda ts: True, TypeError, r"as a number or a scalar tensor.*bool"),
    (lambda ts: torch.tensor(True), TypeError, r"torch\.bool tensor.*expected a number"),
    (lambda ts: torch.tensor(1 + 2j), TypeError, r"complex64 tensor.*expected a number"),
])
@pytest.mark.parametrize("at", [0, 1])
def test_mezo_step_rejects_non_scalar_losses(result, exc, match, at):
    """The closure's result is checked at both forwards; the weights are restored bit for bit (the
    perturbations are exact here: Rademacher z, eps = 1/8, weights k / 32)."""
    goods = _goods()
    clones = _clone_all(goods)
    opt = fastmezo.MeZO(goods, lr=1e-2, eps=EPS, noise="rademacher", seed=4)
    calls = []

    def closure():
        calls.append(1)
        return result(goods) if len(calls) - 1 == at else goods[0].sum()

    with pytest.raises(exc, match=match):
        opt.step(closure)
    assert len(calls) == at + 1
    _assert_untouched(goods, clones)
    assert opt.step_count == 0 and opt.loss_plus is None


def test_mezo_step_closure_none_and_name_keys():
    goods = _goods()
    clones = _clone_all(goods)
    opt = fastmezo.MeZO(goods)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(None)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step("not callable")
    with pytest.raises(ValueError, match=r"keys='name'\) needs named parameters"):
        fastmezo.MeZO(goods, keys="name").step(lambda: 1.0)
    _assert_untouched(goods, clones)


@pytest.mark.parametrize("names", [("plumless", "buckeroo"), ("module.x", "x")])
def test_mezo_name_keys_must_be_distinct(names):
    """keys='name': two names with one key would share a direction. "plumless" and "buckeroo" are a
    known CRC-32 collision; "module.x" and "x" have one canonical name."""
    goods = _goods()[:2]
    clones = _clone_all(goods)
    opt = fastmezo.MeZO(list(zip(names, goods)), keys="name")
    with pytest.raises(ValueError, match="hash to the same noise key"):
        opt.step(lambda: 1.0)
    _assert_untouched(goods, clones)


# ----------------------------------------------------------------------------------------------
# regressions: bugs found while writing these tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("seed", -1), ("noise", "uniform")])
def test_rejected_state_dict_leaves_optimizer_unchanged(field, value):
    source = fastmezo.MeZO(_goods(), lr=0.5, eps=0.25, seed=9)
    sd = source.state_dict()
    sd["mezo"][field] = value
    opt = fastmezo.MeZO(_goods(), lr=0.1, eps=1e-2, seed=3)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["eps"], opt.seed) == (0.1, 1e-2, 3)


def test_overlapping_views_are_rejected():
    base = torch.randn(8, generator=_gen(0))
    clone = base.clone()
    with pytest.raises(ValueError, match="overlaps the memory"):
        F.perturb_([base[:6], base[2:]], 1, 1e-2)
    assert torch.equal(base, clone)
