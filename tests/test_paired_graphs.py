"""CUDA graphs of paired forwards (fastmezo.paired_graphs) and the seed in device memory they need.

A replayed graph must make exactly the step an eager paired forward makes at the step's seed. On the
CPU the Triton kernels run in the interpreter and a stand-in "graph" replays by running the captured
forward again on the graph's static inputs with its seed tensor (what a CUDA graph's launches read):
that checks the seed words, the static inputs, the keys and the fallback bit for bit. With a GPU the
same comparison runs real CUDA graphs, within float tolerances: a captured forward may take other
kernels than an eager one (transformers builds an explicit attention mask while a stream captures).
"""
import pytest
import torch

import fastmezo
from fastmezo.paired_graphs import ForwardGraphs
from conftest import HAS_CUDA, TRITON_DEVICE

transformers = pytest.importorskip("transformers")
pytest.importorskip("triton")

EPS = 1e-2


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    pass


def tiny_opt(dtype=torch.float32, device="cpu", layers=1):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
        return transformers.OPTForCausalLM(cfg).to(dtype=dtype, device=device).eval()


def batches(device, shapes=((2, 8), (2, 8), (3, 6), (2, 8), (3, 6), (3, 6))):
    g = torch.Generator().manual_seed(11)
    out = []
    for rows, length in shapes:
        ids = torch.randint(2, 64, (rows, length), generator=g)
        out.append(dict(input_ids=ids.to(device), labels=ids.clone().to(device)))
    return out


# -- the seed in device memory -----------------------------------------------------------------------
@pytest.mark.parametrize("noise", [0, 1])
def test_a_launch_seeded_from_device_words_equals_one_seeded_by_the_integer(noise, triton_device):
    from fastmezo.kernels.axpbz import Launches, rows_pass_, seed_words

    seed = 0xDEADBEEF12345678
    words = torch.tensor(seed_words(seed), dtype=torch.int32, device=triton_device)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, generator=g).to(triton_device, torch.float16) for n in (300, 4100)]
    want, got = ([torch.full_like(x, float("nan")) for x in xs] for _ in range(2))
    for outs, s in ((want, seed), (got, words)):
        Launches(xs, [3, 4], noise, [0, 1000], outs=outs)(1.0, 0.25, s)
    for w, o, x in zip(want, got, xs):
        assert not o.isnan().any() and not torch.equal(o, x)
        assert torch.equal(w, o)
    rows = torch.randn(5, 24, generator=g).to(triton_device)
    offsets = torch.tensor([0, 48, 48, 5, 200], device=triton_device)
    a, b = rows.clone(), rows.clone()
    rows_pass_(a, 0.5, seed, 9, offsets, noise)
    rows_pass_(b, 0.5, words, 9, offsets, noise)
    assert torch.equal(a, b) and not torch.equal(a, rows)


def test_a_device_seed_of_the_wrong_kind_is_refused(triton_device):
    from fastmezo.kernels.axpbz import Launches

    x = torch.ones(64, device=triton_device)
    with pytest.raises(ValueError, match="int32 tensor of 2 words"):
        Launches([x], [1], 0)(1.0, 0.1, torch.zeros(2, dtype=torch.int64, device=triton_device))
    assert torch.equal(x, torch.ones(64, device=triton_device))


# -- graphs, with a stand-in on the CPU ------------------------------------------------------------------
class _Replayer:
    """A stand-in CUDA graph: "capture" runs the forward (with the device seed of the capture), replay runs
    it again inside the step's perturbation, with the same seed tensor, into the captured outputs."""

    def __init__(self, handle):
        self.handle, self.captures = handle, 0

    def __call__(self, run, pool):
        provider, words = self.handle.paired, self.handle.paired._active[1]
        assert isinstance(words, torch.Tensor)          # the capture's launches read the seed from memory
        out = run()
        self.captures += 1

        class Graph:
            def replay(self):
                with provider.seeded_from(words):
                    got = run()
                for o, g in zip(out, got):
                    o.copy_(g)
        return Graph(), out


def _graphs(handle, model, capture):
    """Graphs of the stand-in kind, where the Triton kernels run here, captured after one eager step."""
    return ForwardGraphs(handle.paired, model, capture=capture, device_types=(TRITON_DEVICE,), warmup=1)


def _steps(model, data, graphs, **options):
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=5, mode="paired", backend="triton", **options) as handle:
        if graphs:
            handle.graphs = _graphs(handle, model, _Replayer(handle))
        records = []
        for b in data:
            loss = handle.step(b)
            opt = handle.optimizer
            records.append((float(loss), opt.loss_plus, opt.loss_minus, opt.projected_grad))
        return handle.graphs, records, [p.detach().clone() for p in model.parameters()]


def test_replayed_forwards_make_the_eager_steps_bit_for_bit():
    data = batches(TRITON_DEVICE)
    _, want, want_params = _steps(tiny_opt(device=TRITON_DEVICE), data, graphs=False, cuda_graphs=False)
    graphs, got, got_params = _steps(tiny_opt(device=TRITON_DEVICE), data, graphs=True)
    assert got == want                                       # every step's losses and gradient
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    # two shapes: each ran eagerly once, was captured (and replayed) on its second step, replayed after
    assert (graphs.captured, graphs.failed, graphs.replayed) == (2, 0, 4)
    assert len({r[3] for r in got}) == len(got)              # new seeds every step, not one replayed z


def test_a_new_eps_takes_a_new_graph_and_a_large_batch_none():
    model = tiny_opt(device=TRITON_DEVICE)
    data = batches(TRITON_DEVICE, shapes=((2, 8),) * 5 + ((3, 8),) * 2)
    with fastmezo.patch(model, lr=0.0, eps=EPS, seed=5, mode="paired", backend="triton") as handle:
        handle.graphs = graphs = _graphs(handle, model, _Replayer(handle))
        for b in data[:3]:
            handle.step(b)
        assert (graphs.captured, graphs.replayed) == (1, 2)
        handle.optimizer.param_groups[0]["eps"] = 2 * EPS       # another eps: another graph
        handle.step(data[3])
        assert (graphs.captured, graphs.replayed) == (1, 2)      # its first step runs eagerly
        handle.step(data[4])
        assert (graphs.captured, graphs.replayed) == (2, 3)
        graphs.max_tokens = 2 * 3 * 8 - 1        # the doubled batch's labels: one too many
        for b in data[5:]:
            handle.step(b)
        assert (graphs.captured, graphs.replayed) == (2, 3)


def test_shapes_beyond_the_tracked_ones_run_eagerly_after_a_notice():
    model = tiny_opt(device=TRITON_DEVICE)
    data = batches(TRITON_DEVICE, shapes=((2, 8), (2, 6), (2, 4), (2, 8), (2, 6), (2, 4), (2, 8)))
    with fastmezo.patch(model, lr=0.0, eps=EPS, seed=5, mode="paired", backend="triton") as handle:
        handle.graphs = graphs = _graphs(handle, model, _Replayer(handle))
        graphs.max_shapes = 2
        for b in data[:2]:
            handle.step(b)
        with pytest.warns(UserWarning, match="more than 2 batch shapes; new ones run without CUDA graphs"):
            handle.step(data[2])
        for b in data[3:]:
            handle.step(b)
        # (2, 8) and (2, 6) captured on their second step, (2, 8) replayed once more; (2, 4) always eager
        assert (graphs.captured, graphs.replayed) == (2, 3) and graphs.shapes_full
    assert not graphs.graphs and not graphs.shapes_full        # remove() drops them


def test_a_forward_that_cannot_be_captured_runs_eagerly_after_a_notice():
    model = tiny_opt(device=TRITON_DEVICE)
    data = batches(TRITON_DEVICE, shapes=((2, 8),) * 4)

    def failing(run, pool):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    _, want, want_params = _steps(tiny_opt(device=TRITON_DEVICE), data, graphs=False, cuda_graphs=False)
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=5, mode="paired", backend="triton") as handle:
        handle.graphs = graphs = _graphs(handle, model, failing)
        got = []
        handle.step(data[0])
        got.append(handle.optimizer.projected_grad)
        with pytest.warns(UserWarning, match="could not be captured in a CUDA graph .RuntimeError: operation not"):
            handle.step(data[1])
        got.append(handle.optimizer.projected_grad)
        for b in data[2:]:
            handle.step(b)
            got.append(handle.optimizer.projected_grad)
    assert (graphs.captured, graphs.failed, graphs.replayed) == (0, 1, 0)
    assert got == [r[3] for r in want]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), want_params))


def test_graphs_stay_out_of_the_way_where_they_do_not_apply():
    model = tiny_opt()
    with fastmezo.patch(model, eps=EPS, mode="paired", backend="triton") as handle:
        assert handle.graphs is not None and handle.graphs.device_types == ("cuda",)
        if TRITON_DEVICE == "cpu":            # a CPU model: eager, no capture attempted
            handle.step(batches("cpu")[0])
            handle.step(batches("cpu")[0])
            assert (handle.graphs.captured, handle.graphs.failed) == (0, 0)
    with fastmezo.patch(model, eps=EPS, mode="paired", cuda_graphs=False) as handle:
        assert handle.graphs is None
    with pytest.raises(ValueError, match="cuda_graphs applies to mode='paired' only"):
        fastmezo.patch(model, cuda_graphs=True)


# -- real CUDA graphs --------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 2e-3)])
def test_cuda_graph_steps_match_eager_steps(dtype, rtol, monkeypatch):
    import fastmezo.paired_copies as copies
    # every weight a large one (copies grouped by the previous forward's order), the lm_head in slabs
    monkeypatch.setattr(copies, "SMALL_NUMEL", 100)
    monkeypatch.setattr(copies, "MAX_COPY_BYTES", 4096)
    data = batches("cuda")

    def steps(cuda_graphs):
        model = tiny_opt(dtype, "cuda")
        with fastmezo.patch(model, lr=0.05, eps=EPS, seed=5, mode="paired", cuda_graphs=cuda_graphs) as handle:
            recs = []
            for b in data:
                handle.step(b)
                recs.append((handle.optimizer.loss_plus, handle.optimizer.loss_minus))
            return handle.graphs, recs, [p.detach().float() for p in model.parameters()]

    _, want, want_params = steps(False)
    graphs, got, got_params = steps(True)
    # shapes A A B A B B, two eager steps of each before its capture
    assert graphs.warmup == 2 and (graphs.captured, graphs.failed, graphs.replayed) == (2, 0, 2)
    for (lp, lm), (wp, wm) in zip(got, want):
        assert lp == pytest.approx(wp, rel=rtol) and lm == pytest.approx(wm, rel=rtol)
    # the updates follow the same z (a replay at the wrong seed would move the weights elsewhere)
    for a, b in zip(got_params, want_params):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-3)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_a_forward_that_syncs_falls_back_to_eager_on_cuda():
    model = tiny_opt(torch.float32, "cuda")
    # a hook that reads a value on the host: a forward that cannot be captured
    model.lm_head.register_forward_pre_hook(lambda module, args: None if float(args[0].abs().max()) >= 0 else args)
    data = batches("cuda", shapes=((2, 8),) * 5)
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=5, mode="paired") as handle:
        for b in data[:handle.graphs.warmup]:
            handle.step(b)
        with pytest.warns(UserWarning, match="could not be captured"):
            handle.step(data[handle.graphs.warmup])
        for b in data[handle.graphs.warmup + 1:]:
            handle.step(b)
        assert (handle.graphs.captured, handle.graphs.failed) == (0, 1)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_large_pair_buffers_take_one_size_while_a_graph_captures(monkeypatch):
    import fastmezo.paired_copies as copies
    monkeypatch.setattr(copies, "MAX_COPY_BYTES", 1 << 20)
    halves = (100, 300_000, 500_000)        # float16 copies of 200 B, 600 KB (above MAX / 2) and 1 MB
    # eager: exactly two copies' elements
    assert [copies.pair_buffer(h, torch.float16, TRITON_DEVICE).numel() for h in halves] == [2 * h for h in halves]
    if not HAS_CUDA:
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [copies.pair_buffer(h, torch.float16, "cuda").numel() for h in halves]
    assert captured == [200, 1 << 20, 1 << 20]          # the large ones: 2 * MAX_COPY_BYTES of float16
