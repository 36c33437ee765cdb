"""Exact mode (fastmezo.patch(model, mode="exact"), fastmezo.exact): the forwards see W + eps z
materialized per module, the stored weights change only at the update.

References are written by hand: z from fastmezo.oracle (the float64 oracle of the noise contract),
perturbed forwards through torch.func.functional_call, the update theta <- (1 - lr wd) theta - lr g z.
Tolerances: the default CPU backend computes normals in float32 (docs/noise.md: within
1e-5 * (1 + |z|) of the oracle), so hand-computed float32 losses agree to ~1e-6 relative and the
projected gradient (a loss difference / 2 eps) to ~1e-3 relative; weights are compared with the
optimizer's own g where that is the point, and within 1e-6 otherwise.
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import fastmezo
from fastmezo import oracle
from fastmezo.exact import ExactModeError, ExactPerturbation
from fastmezo.functional import update_
from fastmezo.plan import Plan
from fastmezo.noise import derive_seed, key_from_name, rounding_seed

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class MLP(nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear, a root-level parameter, and a loss."""

    def __init__(self, seed=0, dtype=torch.float32, width=8):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.emb = nn.Embedding(20, width)
            self.fc1 = nn.Linear(width, width)
            self.norm = nn.LayerNorm(width)
            self.fc2 = nn.Linear(width, 3)
            self.scale = nn.Parameter(torch.tensor([1.5]))     # owned by the root, used in its forward
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=_gen(p.numel())))
        self.to(dtype)

    def forward(self, ids, y):
        h = self.fc2(self.norm(torch.tanh(self.fc1(self.emb(ids)))).mean(1)) * self.scale
        return nn.functional.cross_entropy(h.float(), y)


def mlp_batch():
    return torch.randint(0, 20, (6, 5), generator=_gen(1)), torch.randint(0, 3, (6,), generator=_gen(2))


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg).eval()   # Conv1D layers, lm_head tied to wte


def gpt2_batch():
    ids = torch.randint(0, 50, (2, 8), generator=_gen(3))
    return dict(input_ids=ids, labels=ids)


def snapshot(model):
    """Everything remove() must give back: module objects, classes, forwards, hooks, attributes,
    parameter objects and names."""
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        out.append((name, id(m), type(m), type(m).forward, m.__dict__.get("forward"), sorted(m.__dict__),
                    [(k, id(p)) for k, p in m._parameters.items()],
                    [list(d.items()) for d in (m._forward_pre_hooks, m._forward_hooks,
                                               m._forward_hooks_always_called, m._forward_hooks_with_kwargs,
                                               m._forward_pre_hooks_with_kwargs)]))
    out.append([(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)])
    return out


def z_of(name, p, seed):
    """z of parameter ``name`` for direction seed ``seed`` (name keys, as fastmezo.patch uses)."""
    return oracle.noise(p.numel(), seed, key_from_name(name)).view(p.shape)


# ----------------------------------------------------------------------------------------------
# the weights do not drift
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", [False, True])
def test_null_steps_are_bit_identical(dtype, rounding):
    """lr 0: 30 exact-mode steps with real losses leave every weight bit-identical, in every dtype,
    with or without stochastic rounding of the update; the same steps in place do move bf16/fp16
    weights (so the check can fail)."""
    batch = mlp_batch()
    for mode in ("exact", "inplace"):
        model = MLP(dtype=dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with fastmezo.patch(model, lr=0.0, eps=1e-3, seed=4, mode=mode, stochastic_rounding=rounding) as handle:
            for _ in range(30):
                handle.step(batch)
            assert handle.optimizer.loss_plus != handle.optimizer.loss_minus   # real perturbations
        same = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        if mode == "exact":
            assert same
        elif dtype != torch.float32:
            assert not same


# ----------------------------------------------------------------------------------------------
# one step against the hand-written MeZO step
# ----------------------------------------------------------------------------------------------

def test_exact_step_equals_hand_written_mezo_step():
    model = MLP()
    ids, y = batch = mlp_batch()
    lr, eps, wd, seed = 0.05, 1e-3, 0.1, 11
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = derive_seed(seed, 0)
    z = {n: z_of(n, p, s) for n, p in theta.items()}
    with torch.no_grad():
        l_plus = functional_call(model, {n: theta[n] + eps * z[n] for n in theta}, batch).item()
        l_minus = functional_call(model, {n: theta[n] - eps * z[n] for n in theta}, batch).item()
    g_hand = (l_plus - l_minus) / (2 * eps)

    handle = fastmezo.patch(model, lr=lr, eps=eps, weight_decay=wd, seed=seed, mode="exact")
    handle.step(batch)
    opt = handle.optimizer
    assert opt.loss_plus == pytest.approx(l_plus, rel=1e-6)
    assert opt.loss_minus == pytest.approx(l_minus, rel=1e-6)
    assert opt.projected_grad == pytest.approx(g_hand, rel=1e-3, abs=1e-4)
    decayed = {n for g in opt.param_groups if g["weight_decay"] for n in g["param_names"]}
    assert decayed == {"emb.weight", "fc1.weight", "fc2.weight", "scale"}       # bias and norm skipped
    g = opt.projected_grad
    for n, p in model.named_parameters():
        a = 1 - lr * wd if n in decayed else 1.0
        expected = a * theta[n] - lr * g * z[n]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=n)
        assert not torch.equal(p, theta[n])
    handle.remove()


def test_update_helper_matches_the_formula():
    """fastmezo.exact.update_: theta <- (1 - lr wd) theta - lr g z, one tensor, float32, with the
    reference backend (bit-exact oracle arithmetic)."""
    w = torch.randn(1000, generator=_gen(5))
    w0 = w.clone()
    update_([w], seed=9, lr=0.1, projected_grad=2.5, weight_decay=0.01, keys=[3], backend="oracle")
    z = oracle.noise(1000, 9, 3)
    expected = oracle.pass_with_z(w0, 1 - 0.1 * 0.01, -0.1 * 2.5, z)
    assert torch.equal(w, expected)


def test_update_uses_stochastic_rounding_of_pass_2():
    """bf16, stochastic rounding: the single update pass rounds with rounding_seed(step seed, 2)."""
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    x = torch.randn(4, 16, generator=_gen(6)).to(torch.bfloat16)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = fastmezo.patch(model, lr=1e-3, eps=1e-2, seed=2, mode="exact", keys="name",
                            loss_fn=lambda m, b: m(b).float().pow(2).mean())
    handle.step(x)
    opt = handle.optimizer
    s = opt.last_seed
    for n, p in model.named_parameters():
        zz = z_of(n, p, s)
        r = oracle.rounding_bits_at(torch.arange(p.numel()), rounding_seed(s, 2), key_from_name(n))
        expected = oracle.pass_with_z(theta[n], 1.0, -1e-3 * opt.projected_grad, zz, r)
        # Rounding bits are bit-exact across backends; z may differ in the last float32 bits, which
        # can move a result by one bf16 ulp at most.
        diff = (p.detach().float() - expected.float()).abs()
        ulp = expected.float().abs().clamp(min=1e-30) * 2.0 ** -7
        assert bool((diff <= ulp).all()), n
        assert (p.detach() == expected).float().mean() > 0.99
    handle.remove()


# ----------------------------------------------------------------------------------------------
# in-place and exact follow the same trajectory (float32)
# ----------------------------------------------------------------------------------------------

def test_inplace_and_exact_trajectories_agree_in_fp32():
    """8 steps: losses within 3e-5 relative and weights within 5e-5. The only difference is the float32
    rounding of the in-place restore, but g is a loss difference over 2 eps: one float32 ulp of a loss
    of ~0.9 (6e-8) is 3e-5 in g, so the trajectories separate by ~1e-5 over 8 steps (measured: up to
    1.06e-5 relative with the reference backend on the GPU machine's CPU)."""
    batch = mlp_batch()
    models = {mode: MLP(seed=3) for mode in ("inplace", "exact")}
    handles = {mode: fastmezo.patch(m, lr=0.05, eps=1e-3, seed=8, mode=mode) for mode, m in models.items()}
    for _ in range(8):
        losses = {mode: float(h.step(batch)) for mode, h in handles.items()}
        assert losses["exact"] == pytest.approx(losses["inplace"], rel=3e-5)
    for (n, p), q in zip(models["exact"].named_parameters(), models["inplace"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-5, msg=n)
    assert not torch.equal(models["exact"].fc1.weight, MLP(seed=3).fc1.weight)
    for h in handles.values():
        h.remove()


def test_exact_mode_follows_the_noise_and_each_groups_eps():
    """Rademacher z and two param groups of different eps (a power of two each, so the in-place
    perturbations are exact in float32): exact and in-place steps agree. The first loss is checked
    against a forward at W + eps_g z(Rademacher) written by hand, so a forward that drew Gaussian z,
    or gave every group one eps, is caught at the first step."""
    batch = mlp_batch()
    eps = [2.0 ** -6, 2.0 ** -9]

    def make(mode):
        model = MLP(seed=3)
        groups = [dict(params=[(n, p) for n, p in model.named_parameters() if n.startswith("fc")], eps=eps[0]),
                  dict(params=[(n, p) for n, p in model.named_parameters() if not n.startswith("fc")], eps=eps[1])]
        perturbation = ExactPerturbation(model) if mode == "exact" else "inplace"
        return model, fastmezo.MeZO(groups, lr=0.05, seed=8, noise="rademacher", perturbation=perturbation)

    (exact_model, exact_opt), (inplace_model, inplace_opt) = make("exact"), make("inplace")
    seed = derive_seed(8, 0)
    eps_of = {n: eps[0] if n.startswith("fc") else eps[1] for n, _ in exact_model.named_parameters()}
    values = {n: p.detach() + eps_of[n] * oracle.noise(p.numel(), seed, key_from_name(n), "rademacher").view(p.shape)
              for n, p in exact_model.named_parameters()}
    want = float(functional_call(exact_model, values, batch))
    for _ in range(3):
        losses = [float(opt.step(lambda m=m: m(*batch))) for m, opt in ((exact_model, exact_opt),
                                                                        (inplace_model, inplace_opt))]
        assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert exact_opt.projected_grads[0] * eps[0] == pytest.approx(exact_opt.projected_grads[1] * eps[1])
    for (n, p), q in zip(exact_model.named_parameters(), inplace_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)
    exact_again, opt_again = make("exact")
    assert float(opt_again.step(lambda: exact_again(*batch))) == pytest.approx(want, rel=1e-6)


def test_accumulate_in_exact_mode_equals_step():
    """One micro-batch through accumulate + step_accumulated is the same update as step (float32:
    both are the pass a theta + b z with the same a, b)."""
    batch = mlp_batch()
    a, b = MLP(), MLP()
    ha = fastmezo.patch(a, lr=0.05, eps=1e-3, seed=1, mode="exact")
    hb = fastmezo.patch(b, lr=0.05, eps=1e-3, seed=1, mode="exact")
    ha.step(batch)
    hb.optimizer.accumulate(lambda: b(*batch))
    hb.optimizer.step_accumulated()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    ha.remove()
    hb.remove()


# ----------------------------------------------------------------------------------------------
# Hugging Face layers: GPT-2's Conv1D, tied weights, PEFT LoRA
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_bytes", [None, 0])
def test_gpt2_conv1d_and_tied_weights(group_bytes):
    """The tied wte / lm_head weight is materialized in both modules (group_bytes=0: two hooked
    owners; default: one copy in the model's group) with the same z (one key), and updated once;
    Conv1D layers are perturbed; the result equals in-place mode within 1e-5."""
    model, twin = tiny_gpt2(), tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    theta = model.transformer.wte.weight.detach().clone()
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, module.weight.detach().clone())   # returns None: args unchanged
        return hook

    handle = fastmezo.patch(model, lr=0.5, eps=1e-3, seed=6, mode="exact", group_bytes=group_bytes)
    hooked = {model.transformer.wte, model.lm_head} if group_bytes == 0 else {model}
    assert hooked <= set(handle.exact.groups)
    # Registered after the patch: fastmezo's pre-hook runs first, so these see the materialized copy.
    hooks = [model.transformer.wte.register_forward_pre_hook(record("wte")),
             model.lm_head.register_forward_pre_hook(record("lm_head")),
             model.transformer.h[0].attn.c_attn.register_forward_pre_hook(record("c_attn"))]
    twin_handle = fastmezo.patch(twin, lr=0.5, eps=1e-3, seed=6)
    handle.step(gpt2_batch())
    twin_handle.step(gpt2_batch())
    for h in hooks:
        h.remove()

    s = handle.optimizer.last_seed
    z = z_of("transformer.wte.weight", theta, s)
    assert torch.equal(seen["wte"], seen["lm_head"])                        # same z in both uses
    torch.testing.assert_close(seen["wte"], theta + 1e-3 * z, rtol=0, atol=1e-6)
    assert isinstance(model.transformer.h[0].attn.c_attn, transformers.pytorch_utils.Conv1D)
    assert not torch.equal(seen["c_attn"], model.transformer.h[0].attn.c_attn.weight)
    # Updated once: W - lr g z (twice would be W - 2 lr g z).
    g = handle.optimizer.projected_grad
    assert abs(0.5 * g) * z.abs().max() > 1e-3
    torch.testing.assert_close(model.transformer.wte.weight.detach(), theta - 0.5 * g * z, rtol=0, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)
    handle.remove()
    twin_handle.remove()


def test_peft_lora_in_exact_mode():
    peft = pytest.importorskip("peft")
    cfg = transformers.OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16)

    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            base = transformers.OPTForCausalLM(cfg)
            model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
        return model.eval()

    model, twin = build(), build()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    before = snapshot(model)
    ids = torch.randint(0, 50, (2, 6), generator=_gen(4))
    batch = dict(input_ids=ids, labels=ids)
    handle = fastmezo.patch(model, lr=1e-2, eps=1e-2, seed=2, mode="exact")
    twin_handle = fastmezo.patch(twin, lr=1e-2, eps=1e-2, seed=2)
    for _ in range(3):
        assert float(handle.step(batch)) == pytest.approx(float(twin_handle.step(batch)), rel=1e-6)
    assert handle.exact.materialized == 3 * 2 * len(trained)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
        if n in frozen:
            assert torch.equal(p, frozen[n])
    handle.remove()
    twin_handle.remove()
    assert snapshot(model) == before


# ----------------------------------------------------------------------------------------------
# the patch's life cycle
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_bytes", [None, 0])
def test_remove_restores_the_model_exactly(group_bytes):
    model = tiny_gpt2()
    before = snapshot(model)
    handle = fastmezo.patch(model, lr=1e-2, mode="exact", group_bytes=group_bytes)
    during = snapshot(model)
    assert during != before                                   # hooks and mezo_step are installed
    leaf, root = model.transformer.h[0].mlp.c_fc, model
    # One group for the whole tiny model by default; every owning module hooked with group_bytes=0.
    assert bool(leaf._forward_pre_hooks) == (group_bytes == 0) != bool(root._forward_pre_hooks)
    handle.step(gpt2_batch())
    handle.remove()
    assert snapshot(model) == before
    assert not hasattr(model, "mezo_step") and not hasattr(model, "_fastmezo_patch")
    handle.remove()                                           # idempotent
    fastmezo.patch(model, mode="exact").remove()              # and it can be patched again
    assert snapshot(model) == before


def test_patching_twice_is_refused():
    model = MLP()
    handle = fastmezo.patch(model, mode="exact")
    for mode in ("exact", "inplace"):
        with pytest.raises(RuntimeError, match="already patched"):
            fastmezo.patch(model, mode=mode)
    # A submodule is another model, but its modules are hooked by the first patch.
    sub = nn.Sequential(model.fc1)
    state = snapshot(sub)
    with pytest.raises(ExactModeError, match="'0'.*already patched in exact mode"):
        fastmezo.patch(sub, mode="exact")
    assert snapshot(sub) == state
    handle.remove()
    fastmezo.patch(sub, mode="exact").remove()


def test_context_manager():
    model = MLP()
    before = snapshot(model)
    theta = model.fc1.weight.detach().clone()
    with fastmezo.patch(model, lr=0.05, mode="exact") as handle:
        assert handle.mode == "exact" and handle.optimizer.perturbation_mode == "exact"
        handle.step(mlp_batch())
    assert snapshot(model) == before
    assert not torch.equal(model.fc1.weight, theta)
    with pytest.raises(ZeroDivisionError):
        with fastmezo.patch(model, mode="exact"):
            1 / 0
    assert snapshot(model) == before


def test_bad_mode_is_a_clear_error_and_changes_nothing():
    model = MLP()
    before = snapshot(model)
    for mode in ("Exact", "functional", None):
        with pytest.raises(ValueError, match=f"unknown fastmezo.patch mode {mode!r}.*'inplace', 'exact'"):
            fastmezo.patch(model, mode=mode)
        assert snapshot(model) == before
    with pytest.raises(TypeError, match="perturbation="):
        fastmezo.patch(model, perturbation="inplace")
    # An optimizer option rejected by MeZO leaves no hook behind either.
    with pytest.raises(ValueError, match="on_nonfinite"):
        fastmezo.patch(model, mode="exact", on_nonfinite="ignore")
    assert snapshot(model) == before
    with pytest.raises(ValueError, match="needs the model"):
        fastmezo.MeZO(model.parameters(), perturbation="exact")
    with pytest.raises(TypeError, match="provider"):
        fastmezo.MeZO(model.parameters(), perturbation=42)


def test_optimizer_tensor_outside_the_model_is_refused():
    model = MLP()
    stray = nn.Parameter(torch.ones(3))
    provider = ExactPerturbation(model)
    opt = fastmezo.MeZO(list(model.parameters()) + [stray], perturbation=provider)
    with pytest.raises(ValueError, match="tensor 8 .*not a parameter of the patched model"):
        opt.step(lambda: model(*mlp_batch()))
    assert torch.equal(stray, torch.ones(3))
    with pytest.raises(ValueError, match="not a parameter of this model"):
        ExactPerturbation(model, [stray])
    provider.remove()


# ----------------------------------------------------------------------------------------------
# reads that bypass the owning module; failures leave the weights untouched
# ----------------------------------------------------------------------------------------------

class ParentReadsChild(nn.Module):
    """The parent's forward reads its child's weight directly: the child's hooks never see it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return (self.head(x @ self.proj.weight.t())).pow(2).mean()


def test_weight_read_outside_its_module_is_refused():
    model = ParentReadsChild()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = snapshot(model)
    handle = fastmezo.patch(model, mode="exact", lr=0.1, group_bytes=0)    # hooks on proj and head only
    with pytest.raises(ExactModeError, match=r"'proj\.weight' was read by t\(\).*outside the forward of 'proj'"):
        handle.step(torch.randn(3, 4, generator=_gen(0)))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert isinstance(model.proj._parameters["weight"], nn.Parameter)       # stored parameters back
    assert handle.optimizer.step_count == 0
    handle.remove()
    assert snapshot(model) == state
    # Frozen, it is not perturbed, so the read is fine.
    model.proj.weight.requires_grad_(False)
    with fastmezo.patch(model, mode="exact", lr=0.1, group_bytes=0) as handle:
        handle.step(torch.randn(3, 4, generator=_gen(0)))


def test_group_covering_the_reading_parent_makes_the_read_right():
    """With the default budget the parent is one group: its forward sees the perturbed child weight,
    and the step equals in-place mode's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ParentReadsChild()
    twin = ParentReadsChild()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, generator=_gen(0))
    with fastmezo.patch(model, mode="exact", lr=0.1, seed=4) as handle, \
            fastmezo.patch(twin, lr=0.1, seed=4) as twin_handle:
        assert list(handle.exact.groups) == [model]
        # Step 1 sees the same weights; step 2 the updates, whose g differ by ~1e-5 relative (below).
        for rel in (1e-6, 1e-5):
            assert float(handle.step(x)) == pytest.approx(float(twin_handle.step(x)), rel=rel)
    assert handle.optimizer.projected_grad != 0
    # 1e-5: in-place mode's float32 restore rounds, which moves the second step's g by ~1e-5 relative.
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=n)


def test_root_parameter_is_handled():
    """A parameter of the root used in the root's forward is materialized for the whole forward."""
    model = MLP()
    handle = fastmezo.patch(model, lr=0.05, mode="exact", seed=3)
    seen = []
    hook = model.fc2.register_forward_hook(lambda m, i, o: seen.append(model.scale.detach().clone()))
    handle.step(mlp_batch())
    hook.remove()
    s = handle.optimizer.last_seed
    zs = z_of("scale", model.scale, s)
    theta = MLP().scale.detach()
    torch.testing.assert_close(seen[0], theta + 1e-3 * zs, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[1], theta - 1e-3 * zs, rtol=0, atol=1e-6)
    handle.remove()


def test_failing_forward_and_nonfinite_loss_leave_weights_untouched():
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stored = {n: id(p) for n, p in model.named_parameters()}
    calls = []

    def fails_in_second_forward(m, batch):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return m(*batch)

    with fastmezo.patch(model, mode="exact", loss_fn=fails_in_second_forward) as handle:
        with pytest.raises(KeyError):
            handle.step(mlp_batch())
        assert handle.exact.live_tensors == 0
    with fastmezo.patch(model, mode="exact", loss_fn=lambda m, b: torch.tensor(float("nan"))) as handle:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            handle.step(mlp_batch())
        assert handle.optimizer.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and id(p) == stored[n]


# ----------------------------------------------------------------------------------------------
# memory: one module's perturbed copies at a time
# ----------------------------------------------------------------------------------------------

def test_at_most_one_module_materialized_at_a_time():
    widths = [32, 64, 48, 16]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths, widths[1:])])
    x = torch.randn(5, 32, generator=_gen(0))
    live = []
    for m in model:      # after the patch's pre-hook: what is alive while each layer runs
        m.register_forward_pre_hook(lambda m, a: live.append(handle.exact.live_tensors))
    handle = fastmezo.patch(model, mode="exact", loss_fn=lambda m, b: m(b).pow(2).mean(), group_bytes=0)
    handle.step(x)
    assert live == [2, 2, 2] * 2                       # weight and bias of the running layer only
    assert handle.exact.live_tensors == 0 and handle.exact.materialized == 2 * 6
    largest = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in model)
    assert handle.exact.peak_bytes == largest
    handle.remove()


def _blocks(seed=0):
    """Two blocks of two Linear layers (block 1 the larger), a LayerNorm between them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16)), nn.LayerNorm(16),
                             nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16)))


def _nbytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_groups_materialize_a_block_at_a_time():
    """group_bytes = the largest block's bytes: the hooks sit on the blocks (and the LayerNorm between
    them), each block's four tensors are materialized together before it runs and freed after it, and
    the step is bit-identical to one hooked module per Linear."""
    model, per_module = _blocks(), _blocks()
    budget = _nbytes(model[0])
    x = torch.randn(5, 16, generator=_gen(0))
    live = []
    for block in (model[0], model[2]):
        for layer in block:          # after the block's pre-hook: what is alive while each layer runs
            layer.register_forward_pre_hook(lambda m, a: live.append(handle.exact.live_tensors))
    loss = lambda m, b: m(b).pow(2).mean()      # noqa: E731
    handle = fastmezo.patch(model, mode="exact", loss_fn=loss, group_bytes=budget, lr=0.1, seed=2)
    twin = fastmezo.patch(per_module, mode="exact", loss_fn=loss, group_bytes=0, lr=0.1, seed=2)
    assert list(handle.exact.groups) == [model[0], model[1], model[2]]
    assert len(twin.exact.groups) == 5
    assert float(handle.step(x)) == float(twin.step(x))
    assert live == [4, 4, 4, 4] * 2
    assert handle.exact.peak_bytes == budget and handle.exact.peak_tensors == 4
    assert handle.exact.materialized == 2 * 10 and handle.exact.live_tensors == 0
    for p, q in zip(model.parameters(), per_module.parameters()):
        assert torch.equal(p, q)
    # The whole model under the default budget (>= MIN_GROUP_BYTES): one hooked module.
    handle.remove()
    twin.remove()
    with fastmezo.patch(model, mode="exact", loss_fn=loss) as whole:
        assert list(whole.exact.groups) == [model]
        whole.step(x)
        assert whole.exact.peak_bytes == _nbytes(model)


def test_a_module_shared_between_blocks_is_hooked_on_its_own():
    """A Linear used by two blocks could run outside either block's forward: neither block (nor the
    root) is a group, the shared layer has its own hooks, and the step equals in-place mode's."""
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            shared = nn.Linear(8, 8)
            return nn.Sequential(nn.Sequential(nn.Linear(8, 8), shared), nn.Sequential(shared, nn.Linear(8, 8)))

    model, twin = build(), build()
    assert model[0][1] is model[1][0]
    x = torch.randn(4, 8, generator=_gen(1))
    loss = lambda m, b: m(b).pow(2).mean()      # noqa: E731
    with fastmezo.patch(model, mode="exact", loss_fn=loss, lr=0.1, seed=5) as handle, \
            fastmezo.patch(twin, loss_fn=loss, lr=0.1, seed=5) as twin_handle:
        assert list(handle.exact.groups) == [model[0][0], model[0][1], model[1][1]]
        assert float(handle.step(x)) == pytest.approx(float(twin_handle.step(x)), rel=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="inplace", group_bytes=1 << 20), "group_bytes applies to mode='exact' only"),
    (dict(mode="exact", group_bytes=-1), "group_bytes must be None"),
    (dict(mode="exact", group_bytes=2.5), "group_bytes must be None"),
])
def test_bad_group_bytes_is_a_clear_error_and_changes_nothing(kwargs, message):
    model = MLP()
    state = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastmezo.patch(model, **kwargs)
    assert snapshot(model) == state


def test_launch_tables_of_the_copies_are_built_once(triton_device):
    """The copies of a group are carved from one buffer whose address changes between forwards; the
    Triton launcher's tables record where each copy lies relative to the first, so after the first
    step every launch finds its table in the cache (none is built, none uploaded)."""
    from fastmezo.kernels import axpbz as K
    model = MLP().to(triton_device)
    batch = tuple(t.to(triton_device) for t in mlp_batch())
    with fastmezo.patch(model, mode="exact", backend="triton", group_bytes=0, lr=0.05) as handle:
        handle.step(batch)
        before = K._tables.misses
        keep = [torch.empty(1000, device=triton_device) for _ in range(3)]  # move the allocator along
        for _ in range(2):
            handle.step(batch)
            keep.append(torch.empty(777, device=triton_device))
        assert K._tables.misses == before
        assert handle.exact.materialized == 3 * 2 * 8        # emb 1, fc1 2, norm 2, fc2 2, the root's scale 1


def test_copies_follow_the_tensors_of_each_perturbation():
    """A group's copy layout is reused while it materializes the same tensors and rebuilt when the
    perturbed set changes (here: all weights, then only the first layer's weight, then all again)."""
    model = _blocks()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    provider = ExactPerturbation(model, params, group_bytes=1 << 30)
    assert list(provider.groups) == [model]
    seen = []
    model[0][0].register_forward_pre_hook(lambda m, a: seen.append((m.weight.clone(), m.bias.clone())))
    x = torch.randn(3, 16, generator=_gen(5))
    for subset in (range(len(params)), [0], range(len(params))):
        tensors = [params[i] for i in subset]
        keys = [10 + i for i in subset]
        plan = Plan(tensors, keys=keys, backend="oracle")
        with torch.no_grad(), provider.perturbation(plan, 7, [1e-2]):
            model(x)
        w, b = seen[-1]
        expected_w = theta[0] + 1e-2 * oracle.noise(theta[0].numel(), 7, 10).view(theta[0].shape)
        expected_b = theta[1] + 1e-2 * oracle.noise(theta[1].numel(), 7, 11) if 1 in subset else theta[1]
        torch.testing.assert_close(w, expected_w, rtol=0, atol=1e-6)
        torch.testing.assert_close(b, expected_b, rtol=0, atol=1e-6)
        assert provider.live_tensors == 0
    for p, t in zip(params, theta):
        assert torch.equal(p, t)
    provider.remove()


def test_copies_follow_a_dtype_change_after_patching():
    """model.half() after patching keeps the Parameter objects but replaces their data: the next
    step's copies are float16 too, bit-identical to those of a provider that lays them out afresh."""
    model, twin = MLP(), MLP()
    loss = lambda m, b: m(*b)      # noqa: E731
    with fastmezo.patch(model, mode="exact", lr=0.05, seed=2, loss_fn=loss) as handle, \
            fastmezo.patch(twin, mode="exact", lr=0.05, seed=2, loss_fn=loss) as twin_handle:
        handle.step(mlp_batch())
        twin_handle.step(mlp_batch())
        model.half()
        twin.half()
        twin_handle.exact._layouts.clear()          # the twin's layouts are made for float16 from scratch
        seen = []
        hook = model.fc1.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
        assert float(handle.step(mlp_batch())) == float(twin_handle.step(mlp_batch()))
        hook.remove()
    assert seen == [torch.float16] * 2
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.dtype == torch.float16 and torch.equal(p, q)
