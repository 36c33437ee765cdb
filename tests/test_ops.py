"""The op contract (fastmezo.ops): two torch.library operators with mutation annotations and fake
implementations, the oracle as the default kernel, the chosen backend registered per device type; eager
calls skip the dispatcher, anything tracing goes through it, and both give the same bits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmezo import backends, functional as F, ops, oracle
from conftest import backend_devices


def test_schemas_declare_the_mutation():
    in_place = str(torch.ops.fastmezo.scale_add_noise_.default._schema)
    out = str(torch.ops.fastmezo.scale_add_noise_out.default._schema)
    assert "Tensor(a!)[] tensors" in in_place, in_place
    assert "Tensor[] tensors, Tensor(a!)[] outs" in out, out


def _args(device):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(10, generator=gen).to(device), torch.randn(3, 4, generator=gen).to(device).half()]
    return tensors, [1.0, 0.5], [0.1, -0.2], 5, [0, 1], [0, 3], 0


def test_opcheck_in_place_and_out_of_place():
    """Schema, fake tensors and AOT dispatch of both ops on the CPU kernel installed here."""
    ops.install(torch.device("cpu"))
    tensors, a, b, seed, keys, offsets, noise = _args("cpu")
    torch.library.opcheck(torch.ops.fastmezo.scale_add_noise_.default,
                          (tensors, a, b, seed, keys, offsets, noise, True, -7))
    outs = [torch.empty_like(t) for t in tensors]
    torch.library.opcheck(torch.ops.fastmezo.scale_add_noise_out.default,
                          (tensors, outs, a, b, seed, keys, offsets, noise, None))


def test_fake_impl_changes_nothing_and_runs_on_meta():
    t = [torch.empty(7, device="meta")]
    assert torch.ops.fastmezo.scale_add_noise_(t, [1.0], [1.0], 1, [0], [0], 0, True) is None


def test_install_registers_the_chosen_backend_once(monkeypatch):
    chosen = ops.install(torch.device("cpu"))
    assert chosen is backends.select(torch.device("cpu"))
    monkeypatch.setenv(backends.ENV_VAR, "oracle")          # too late for this process: installed once
    assert ops.install(torch.device("cpu")) is chosen


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rounding", [None, 2**63 + 5])
def test_dispatcher_path_gives_the_eager_bits(rounding):
    """Under a dispatch mode the pass goes through the operator (which the mode sees) and writes the
    same values as the eager path that skips the dispatcher, in place and out of place."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=gen).to(torch.bfloat16)
    eager, traced = x.clone(), x.clone()
    F.perturb_(eager, 2**64 - 3, 0.25, rounding_seed=rounding)
    mode = _Seen()
    with mode:
        F.perturb_(traced, 2**64 - 3, 0.25, rounding_seed=rounding)
    assert "fastmezo.scale_add_noise_.default" in mode.ops
    assert torch.equal(traced, eager) and not torch.equal(traced, x)
    mode = _Seen()
    with mode:
        out = F.perturbed(x, 2**64 - 3, 0.25)
    assert "fastmezo.scale_add_noise_out.default" in mode.ops
    assert torch.equal(out, F.perturbed(x, 2**64 - 3, 0.25))


def test_torch_compile_runs_the_pass():
    """A compiled function that perturbs a tensor writes what eager does (the mutation is functionalized
    and written back, not dropped)."""
    def step(w):
        F.perturb_(w, 11, 0.5, keys=[4])
        return w * 2

    w = torch.randn(64, generator=torch.Generator().manual_seed(1))
    expected = w.clone()
    F.perturb_(expected, 11, 0.5, keys=[4])
    got = torch.compile(step, backend="aot_eager", fullgraph=False)(w.clone())
    torch.testing.assert_close(got, expected * 2, rtol=0, atol=0)


def test_eager_pass_bumps_version_counters():
    """In-place writes must be visible to autograd's saved-tensor checks, as any in-place op's are."""
    x, y = torch.zeros(5), torch.zeros(5)
    out = torch.empty(5)
    v = (x._version, out._version)
    F.perturb_(x, 1, 1.0)
    F.perturbed(y, 1, 1.0, out=out)
    assert x._version > v[0] and out._version > v[1]
    w = torch.ones(3, requires_grad=True)
    saved = w * 1.0
    h = saved.exp()           # exp saves its output: a later in-place change must be detected
    F.perturb_(h.detach(), 2, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        h.sum().backward()


@pytest.mark.parametrize("reader", ["native", "torch"])
def test_bump_versions_is_torchs_increment_version(reader, monkeypatch):
    """fastmezo.ops.bump_versions (fastmezo._C's in-place read of the list, or torch's own) adds one to
    every tensor's version, views share their base's counter, and an inference tensor (which has no
    counter) is skipped, as torch skips it."""
    from fastmezo import ops
    from fastmezo.backends import native
    if reader == "native":
        if native.load() is None:
            pytest.skip(native.load_error())
        monkeypatch.setattr(ops, "_bump", native.load().bump_versions)
    else:
        monkeypatch.setattr(ops, "_bump", torch.autograd.graph.increment_version)
    base = torch.randn(6)
    tensors = [torch.nn.Parameter(torch.randn(3)), base[:2], torch.randn(2, 2).t()]
    for kind in (list, tuple):
        before = [t._version for t in tensors] + [base._version]
        ops.bump_versions(kind(tensors))
        assert [t._version for t in tensors] + [base._version] == [v + 1 for v in before[:3]] + [before[3] + 1]
    with torch.inference_mode():
        frozen = torch.ones(2)
    version = tensors[0]._version
    ops.bump_versions([frozen, tensors[0]])
    assert tensors[0]._version == version + 1
    with pytest.raises((TypeError, RuntimeError), match="tensor"):
        ops.bump_versions([base, 3])


def test_grad_mode_comes_back_also_when_the_pass_raises(monkeypatch):
    """A pass runs with autograd off (it mutates leaves that require grad) and switches it back on,
    also when the backend raises."""
    seen = []
    backend = backends.select(torch.device("cpu"))
    monkeypatch.setattr(backend, "run", lambda *args: seen.append(torch.is_grad_enabled()))
    x = torch.ones(3, requires_grad=True)
    assert torch.is_grad_enabled()
    F.perturb_(x, 7, 1.0)
    assert seen == [False] and torch.is_grad_enabled()

    def boom(*args):
        raise RuntimeError("kernel failed")
    monkeypatch.setattr(backend, "run", boom)
    with pytest.raises(RuntimeError, match="kernel failed"):
        F.perturb_(x, 7, 1.0)
    assert torch.is_grad_enabled()


def test_the_default_kernel_is_the_oracle():
    """The CompositeExplicitAutograd kernel (what a device type without a registered backend runs)
    computes the oracle's pass, seed bits taken from the schema's int64 included."""
    x = torch.randn(50, generator=torch.Generator().manual_seed(9))
    want = x.clone()
    oracle.scale_add_noise_(want, 0.5, 0.25, 2**64 - 21, 3, 0, 7)
    got = x.clone()
    ops._oracle_in_place([got], [0.5], [0.25], -21, [3], [7], 0)
    assert torch.equal(got, want) and not torch.equal(got, x)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_run_pair_is_the_pass_with_b_and_with_minus_b(backend, device, monkeypatch):
    """ops.run_pair: the + and - outputs are the out-of-place passes with b and -b bit for bit, whatever
    the backend and the outputs' layout; a backend that writes pairs does it in one call when every -
    output lies the same distance after its + output, in two otherwise, and the outputs' version
    counters are bumped either way."""
    module = backends.by_name(backend)
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16).to(device)
          for n in (100, 37, 8)]
    keys, offsets, b = [3, 4, 5], [0, 16, 9], [2e-3, 2e-3, 5e-3]
    calls = []
    real = module.run
    monkeypatch.setattr(module, "run", lambda *a, **k: (calls.append(k.get("pair_delta")), real(*a, **k))[1])
    want = {}
    for sign in (1, -1):
        outs = [torch.empty_like(x) for x in xs]
        real(xs, outs, [1.0] * 3, [sign * v for v in b], 77, keys, offsets, 0)
        want[sign] = outs
    buf = torch.full((2, 160), float("nan"), dtype=torch.bfloat16, device=device)
    laid_out = ([buf[0, :100], buf[0, 100:137], buf[0, 140:148]], [buf[1, :100], buf[1, 100:137], buf[1, 140:148]])
    # - outputs allocated in the reverse order: no common distance from their + outputs
    apart = ([torch.empty_like(x) for x in xs], [torch.empty_like(x) for x in reversed(xs)][::-1])
    for plus, minus in (laid_out, apart):
        calls.clear()
        versions = [t._version for t in plus + minus]
        ops.run_pair(module, xs, plus, minus, b, 77, keys, offsets, 0)
        for got, ref in zip(plus + minus, want[1] + want[-1]):
            assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
        assert all(t._version > v for t, v in zip(plus + minus, versions))
        pairs = getattr(module, "PAIRS", False) and plus is laid_out[0]
        assert calls == ([160] if pairs else [None, None]), (backend, calls)
