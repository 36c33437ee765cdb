"""Paired mode (fastmezo.paired): one forward over a doubled batch, + half at W + eps z, - half at
W - eps z. The reference is exact mode (fastmezo.exact), which runs the two forwards separately on
materialized copies; a paired step must equal an exact-mode step up to float rounding.

Tolerances of one step (the perturbed weights are bit-identical, so the losses differ only by how
batch-size-dependent kernels and the loss reduction round): losses within LOSS_RTOL relative, float32
and bfloat16 alike (both modes reduce the loss in float32); the projected gradient
g = (l+ - l-) / (2 eps) within the two losses' tolerance divided by 2 eps; updated weights within
lr * |g - g_exact| * max|z| plus 2 ulp of the stored dtype."""
import pytest
import torch

import fastmezo
from fastmezo.functional import perturbed
from fastmezo.paired import PairedModeError, PairedPerturbation
from fastmezo.plan import Plan
from conftest import backend_devices

transformers = pytest.importorskip("transformers")

EPS = 1e-2
LOSS_RTOL = 1e-5
Z_MAX = 5.8          # a Gaussian z of the contract is at most sqrt(-2 ln 2**-24) = 5.77 (docs/noise.md)


def tiny(kind, dtype, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "opt":
            cfg = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                         num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32)
            model = transformers.OPTForCausalLM(cfg)
        else:
            cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
            model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def batch(rows=3, length=10):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 64, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0                         # a padded row: masked positions must not leak into the halves
    labels = ids.clone()
    labels[mask == 0] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def run(kind, dtype, mode, lr=0.05, steps=1, **options):
    model = tiny(kind, dtype)
    with fastmezo.patch(model, lr=lr, eps=EPS, seed=3, mode=mode, **options) as handle:
        records = []
        for _ in range(steps):
            handle.step(batch())
            opt = handle.optimizer
            records.append((opt.loss_plus, opt.loss_minus, opt.projected_grad))
    return model, records


@pytest.mark.parametrize("backend,device", backend_devices())
def test_copies_are_exact_modes_bit_for_bit(backend, device):
    # Both halves' copies come from one z per tensor, with the fused pass's arithmetic: made as a pair
    # (one pass, where the backend writes pairs) or alone, they are exact mode's copies bit for bit.
    from fastmezo.paired_copies import ForwardCopies

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gen = torch.Generator().manual_seed(1)
        ws = [torch.randn(37, 11, generator=gen).to(dtype).to(device), torch.randn(300, generator=gen).to(dtype).to(device),
              torch.randn(70000, generator=gen).to(dtype).to(device)]          # the last above SMALL_NUMEL
        plan = Plan(ws, keys=[5, 6, 7], offsets=[0, 8, 3], backend=backend)
        copies = ForwardCopies(plan, 11, {id(w): (k, o, 0.003) for w, k, o in zip(ws, [5, 6, 7], [0, 8, 3])})
        assert set(copies.small) == {id(ws[0]), id(ws[1])}
        pairs = copies.pairs(ws)
        for sign, made in ((1, pairs[0]), (-1, pairs[1])):
            alone = copies.copies(ws, [sign] * 3)
            for w, k, o, mine, single in zip(ws, [5, 6, 7], [0, 8, 3], made, alone):
                theirs = perturbed(w, 11, sign * 0.003, keys=[k], offsets=[o], backend=backend)
                assert mine.dtype == dtype and mine.shape == w.shape and torch.equal(mine, theirs), (dtype, sign)
                assert torch.equal(single, theirs) and not torch.equal(mine, w)


def test_a_module_makes_both_halves_copies_in_one_pass_and_holds_none_after(monkeypatch):
    """The + half of a module makes its - copies too (one pass), the - half takes them, nothing is kept
    after the call; a - half without a + half before it makes its own."""
    from fastmezo import ops
    from fastmezo.paired_copies import ForwardCopies

    calls = []
    for name in ("run", "run_pair"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
    w = torch.randn(300, 300, generator=torch.Generator().manual_seed(2))
    plan = Plan([w], keys=[5])
    copies = ForwardCopies(plan, 11, {id(w): (5, 0, 0.003)})
    module = object()
    plus = copies.for_half(module, [w], +1)
    minus = copies.for_half(module, [w], -1)
    # (run_pair may call run itself, twice, on a backend without pairs)
    assert calls.count("run_pair") == 1 and calls.index("run_pair") == 0 and copies.kept == {}
    assert torch.equal(plus[0], perturbed(w, 11, 0.003, keys=[5]))
    assert torch.equal(minus[0], perturbed(w, 11, -0.003, keys=[5]))
    calls.clear()
    again = copies.for_half(module, [w], -1)
    assert calls == ["run"] and torch.equal(again[0], minus[0])


@pytest.mark.parametrize("kind", ["opt", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [None, "triton"])      # triton: the pair pass makes both halves' copies
def test_paired_step_equals_exact_step(kind, dtype, backend):
    lr = 0.05
    if backend == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available():      # CPU tensors reach Triton only through the interpreter
            pytest.skip("the interpreter is off where CUDA is; test_paired_linear runs these steps on CUDA")
    exact, [(rlp, rlm, rg)] = run(kind, dtype, "exact", lr=lr, backend=backend)
    paired, [(lp, lm, g)] = run(kind, dtype, "paired", lr=lr, backend=backend, fused=False)
    assert lp != lm                                        # the halves did see different weights
    assert lp == pytest.approx(rlp, rel=LOSS_RTOL) and lm == pytest.approx(rlm, rel=LOSS_RTOL)
    assert abs(g - rg) <= 2 * LOSS_RTOL * max(abs(rlp), abs(rlm)) / (2 * EPS)
    moved = False
    for (name, p), q, p0 in zip(paired.named_parameters(), exact.parameters(), tiny(kind, dtype).parameters()):
        # The two updates differ by lr * (g - rg) * z, |z| <= Z_MAX, plus the rounding of the stored dtype.
        ulp = torch.finfo(dtype).eps * torch.maximum(p.detach().abs(), q.detach().abs()).float()
        bound = lr * abs(g - rg) * Z_MAX + 2 * ulp + torch.finfo(dtype).tiny
        assert ((p.float() - q.float()).abs() <= bound).all(), name
        moved |= not torch.equal(p, p0)
    assert moved


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_small_tensors_are_copied_once_per_forward_with_the_same_bits(kind, monkeypatch):
    """Biases and norms' weights are perturbed for both halves by one pass before the forward, not by a
    pass per module and half: the same steps (losses, gradients, weights, bit for bit) as with every copy
    made by its module, in far fewer pass calls."""
    from fastmezo import ops, paired_copies

    calls = []
    for name in ("run", "run_pair"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, **k: (calls.append(len(a[1])), _r(*a, **k))[1])
    results = []
    for small_total in (paired_copies.SMALL_TOTAL, 0):
        monkeypatch.setattr(paired_copies, "SMALL_TOTAL", small_total)
        calls.clear()
        model, records = run(kind, torch.float32, "paired", steps=2, fused=False)
        results.append((records, [p.detach().clone() for p in model.parameters()], len(calls)))
    (rec, weights, n_calls), (rec0, weights0, n_calls0) = results
    assert rec == rec0
    assert all(torch.equal(w, w0) for w, w0 in zip(weights, weights0))
    assert n_calls < n_calls0 / 2, (n_calls, n_calls0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_weights_bit_identical_after_null_steps(dtype):
    model = tiny("opt", dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with fastmezo.patch(model, lr=0.0, eps=EPS, seed=1, mode="paired") as handle:
        for _ in range(3):
            handle.step(batch())
            assert handle.optimizer.loss_plus != handle.optimizer.loss_minus
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all("forward" not in m.__dict__ for m in model.modules())     # remove() put the forwards back


def test_weights_move_only_at_the_update():
    # During a forward the stored weights are the ones the step found (the first step's forward is
    # checked for reads of stored weights, so this looks from the second step on).
    model = tiny("llama", torch.float32)
    seen, at_start = [], []

    def loss_fn(m, doubled):
        if len(at_start) > 1:
            seen.append(all(torch.equal(p, q) for p, q in zip(m.parameters(), at_start[-1])))
        logits = m(input_ids=doubled["input_ids"]).logits
        rows = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), doubled["input_ids"][:, 1:],
                                                 reduction="none").mean(1)
        return rows                                  # one loss per row of the doubled batch
    with fastmezo.patch(model, lr=0.05, eps=EPS, seed=2, mode="paired", loss_fn=loss_fn) as handle:
        for _ in range(3):
            at_start.append([p.detach().clone() for p in model.parameters()])
            handle.step(dict(input_ids=batch()["input_ids"]))
    assert seen == [True, True]
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), at_start[-1]))


def test_batch_norm_in_training_mode_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    loss_fn = lambda m, b: m(b).squeeze(1) ** 2             # noqa: E731
    with fastmezo.patch(model, lr=0.1, mode="paired", loss_fn=loss_fn, eval_mode=False) as handle:
        with pytest.raises(PairedModeError, match="batch norm in training mode"):
            handle.step(x)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    with fastmezo.patch(model, lr=0.1, mode="paired", loss_fn=loss_fn) as handle:   # eval mode: rows independent
        handle.step(x)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_read_outside_the_owning_module_is_refused():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.linear(self.inner(x), self.inner.weight)   # a read past the module

    model = Tied()
    before = [p.detach().clone() for p in model.parameters()]
    with fastmezo.patch(model, mode="paired", loss_fn=lambda m, b: m(b).pow(2).mean(1)) as handle:
        with pytest.raises(PairedModeError, match="inner.weight"):
            handle.step(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unusable_losses_and_batches_are_refused():
    model = tiny("opt", torch.float32)
    with fastmezo.patch(model, mode="paired") as handle:
        with pytest.raises(ValueError, match="labels"):
            handle.step(dict(input_ids=batch()["input_ids"]))
    with fastmezo.patch(model, mode="paired", loss_fn=lambda m, b: torch.ones(3)) as handle:
        with pytest.raises(ValueError, match="even length"):
            handle.step(batch())
    with fastmezo.patch(model, mode="paired") as handle:       # a closure must return the pair
        with pytest.raises(ValueError, match="l_plus, l_minus"):
            handle.step(lambda: torch.tensor(1.0))


def test_other_module_kinds_get_a_notice_and_still_match_exact_mode():
    # GPT-2's Conv1D is neither Linear nor a norm: materialized per half, with a one-line notice.
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
            return transformers.GPT2LMHeadModel(cfg).eval()
    b = batch()
    exact = build()
    with fastmezo.patch(exact, lr=0.05, eps=EPS, seed=5, mode="exact") as handle:
        handle.step(b)
        ref = (handle.optimizer.loss_plus, handle.optimizer.loss_minus)
    paired = build()
    with pytest.warns(UserWarning, match="Conv1D"):
        handle = fastmezo.patch(paired, lr=0.05, eps=EPS, seed=5, mode="paired")
    with handle:
        handle.step(b)
        got = (handle.optimizer.loss_plus, handle.optimizer.loss_minus)
    assert got == pytest.approx(ref, rel=1e-5)
    for p, q in zip(paired.parameters(), exact.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["causal", "single_label", "regression", "multi_label", "tokens"])
@pytest.mark.parametrize("chunked", [False, True])
def test_half_losses_are_the_models_own_loss_of_each_half(head, chunked, monkeypatch):
    """l+ and l- are each half's own loss; with ``chunked`` the cross-entropy reads one row of classes at
    a time."""
    from fastmezo import paired_batch
    from fastmezo.paired_batch import double, half_losses
    if chunked:
        monkeypatch.setattr(paired_batch, "LOSS_CHUNK_BYTES", 1)
    g = torch.Generator().manual_seed(3)
    b = batch()
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if head == "causal":
            model, labels = tiny("opt", torch.float32), b["labels"]
        elif head == "tokens":
            cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, num_labels=3)
            model = transformers.BertForTokenClassification(cfg).eval()
            labels = torch.randint(0, 3, ids.shape, generator=g).masked_fill(mask == 0, -100)
        else:
            num = {"single_label": 3, "regression": 1, "multi_label": 4}[head]
            cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                         num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                         num_labels=num, pad_token_id=1,
                                         problem_type="multi_label_classification" if head == "multi_label" else None)
            model = transformers.OPTForSequenceClassification(cfg).eval()
            labels = {"single_label": torch.randint(0, 3, (3,), generator=g),
                      "regression": torch.randn(3, generator=g),
                      "multi_label": torch.randint(0, 2, (3, 4), generator=g).float()}[head]
    # Different inputs per half, so that the two losses differ.
    ids2 = torch.randint(2, 64, ids.shape, generator=g)
    doubled = dict(input_ids=torch.cat([ids, ids2]), attention_mask=double(mask), labels=double(labels))
    with torch.no_grad():
        lp, lm = half_losses(model, model(input_ids=doubled["input_ids"], attention_mask=doubled["attention_mask"]),
                             doubled["labels"])
        own_p = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        own_m = model(input_ids=ids2, attention_mask=mask, labels=labels).loss
    assert float(lp) != float(lm)
    assert float(lp) == pytest.approx(float(own_p), rel=1e-5)
    assert float(lm) == pytest.approx(float(own_m), rel=1e-5)


def test_a_failing_forward_leaves_the_model_as_it_was():
    model = tiny("opt", torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stored = {n: id(p) for n, p in model.named_parameters()}
    calls = []

    def loss_fn(m, doubled):
        calls.append(1)
        out = m(input_ids=doubled["input_ids"]).logits.float().mean((1, 2))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return out
    with fastmezo.patch(model, lr=0.05, eps=EPS, mode="paired", loss_fn=loss_fn) as handle:
        with pytest.raises(KeyboardInterrupt):
            handle.step(batch())
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]) and id(p) == stored[n], n      # no copy left swapped in
        assert handle.paired._half is None and handle.paired._active is None
        handle.step(batch())                          # a retry runs a normal step
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_optimizer_takes_the_provider_directly_with_accumulation():
    # MeZO(perturbation=PairedPerturbation(model)): the closure runs its own doubled batch and returns
    # (l+, l-); micro-batches accumulate as in exact mode.
    from fastmezo.exact import ExactPerturbation
    from fastmezo.paired_batch import double, half_losses
    micro = [batch(rows=2, length=8), batch(rows=3, length=6)]
    results = {}
    for mode in ("exact", "paired"):
        model = tiny("llama", torch.float32)
        provider = (ExactPerturbation if mode == "exact" else PairedPerturbation)(model)
        opt = fastmezo.MeZO(model.named_parameters(), lr=0.05, eps=EPS, seed=4, perturbation=provider)
        assert opt.perturbation_mode == mode
        for b in micro:
            if mode == "exact":
                opt.accumulate(lambda: model(**b).loss)
            else:
                d = double(b)
                opt.accumulate(lambda: half_losses(model, model(input_ids=d["input_ids"],
                                                                attention_mask=d["attention_mask"]), d["labels"]))
        opt.step_accumulated()
        provider.remove()
        results[mode] = (opt.loss_plus, opt.loss_minus, opt.projected_grad, [p.detach() for p in model.parameters()])
    (lp, lm, g, ws), (rlp, rlm, rg, rws) = results["paired"], results["exact"]
    assert lp != lm and (lp, lm) == pytest.approx((rlp, rlm), rel=LOSS_RTOL)
    assert abs(g - rg) <= 4 * LOSS_RTOL * max(abs(rlp), abs(rlm)) / (2 * EPS)
    for p, q in zip(ws, rws):
        assert ((p - q).abs() <= 0.05 * abs(g - rg) * Z_MAX + 2 * torch.finfo(p.dtype).eps * p.abs() + 1e-30).all()


def test_a_module_without_batch_rows_is_refused():
    # A Linear applied to a tensor shared by the whole batch (no batch dimension): its halves cannot be
    # told apart, so the step refuses instead of stacking two copies of its output.
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
                                            requires_grad=False)
            self.proj = torch.nn.Linear(3, 3)

        def forward(self, x):
            return x @ self.proj(self.table).sum(0, keepdim=True).T

    model = Shared()
    before = [p.detach().clone() for p in model.parameters()]
    with fastmezo.patch(model, mode="paired", loss_fn=lambda m, b: m(b).squeeze(1)) as handle:
        with pytest.raises(PairedModeError, match="'proj'.*batch-first"):
            handle.step(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_an_embedding_perturbs_only_its_looked_up_rows_as_the_whole_weight_would(monkeypatch, backend, device):
    from fastmezo import backends, ops, paired_copies

    # Ids with runs of consecutive rows, repeats and a row at the end of the table; the lookup of each
    # half must be exactly the rows of exact mode's whole-weight copy, while only those rows are made.
    emb = torch.nn.Embedding(40, 23)          # odd rows: most start inside a Philox call of the stream
    with torch.no_grad():
        emb.weight.normal_(generator=torch.Generator().manual_seed(2))
    emb.to(device)
    ids = torch.tensor([[3, 4, 5, 39, 3], [0, 17, 17, 18, 1], [3, 4, 5, 39, 3], [9, 9, 30, 2, 1]], device=device)
    plan = Plan([emb.weight], keys=[5], offsets=[8], backend=backend)
    provider = PairedPerturbation(emb)
    monkeypatch.setattr(paired_copies, "SMALL_TOTAL", 0)     # a table this small is otherwise copied whole
    made = []
    real = ops.run_pair
    monkeypatch.setattr(ops, "run_pair", lambda *a, **k: (made.append([t.shape for t in a[1]]), real(*a, **k))[1])
    with provider.perturbation(plan, 11, [0.003]):
        out = emb(ids)
    assert provider.paths == {"<root>": "gathered"}
    if getattr(backends.by_name(backend), "rows_pass", None) is not None:
        assert made == []                      # every looked-up row where it lands, no pair pass
    else:
        assert made == [[(6, 23), (1, 23), (2, 23), (1, 23), (1, 23)]]   # runs of looked-up rows, one pass
    for sign, half in ((1, ids[:2]), (-1, ids[2:])):
        whole = perturbed(emb.weight.detach(), 11, sign * 0.003, keys=[5], offsets=[8], backend=backend)
        assert torch.equal(out[:2] if sign > 0 else out[2:], whole[half])
    assert not torch.equal(out[:2], out[2:])                               # same ids, different halves
    if device == "cpu":                       # (on CUDA a bad index is a device-side assert)
        for bad in (-1, 40):                  # an index would wrap around or run off: embedding's own error
            with pytest.raises(IndexError), provider.perturbation(plan, 11, [0.003]):
                emb(torch.tensor([[1, bad], [2, 3]]))


def test_a_tied_lm_head_sees_the_whole_perturbed_weight():
    model = tiny("opt", torch.float32)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    with fastmezo.patch(model, lr=0.0, eps=EPS, seed=3, mode="paired", fused=False) as handle:
        handle.step(batch())
        paths = handle.paired.paths
    assert paths["model.decoder.embed_tokens"] == "gathered" and paths["lm_head"] == "materialized"
