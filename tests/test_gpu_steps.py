"""Whole MeZO steps on a CUDA device against the torch oracle (fastmezo.oracle): what the step
benchmark (bench/bench_steps.py) times must first compute the right thing there. Skipped without CUDA
(the CPU paths are covered by test_optim.py, test_exact.py and test_pinned_steps.py).

* in place: one ``fastmezo.MeZO`` step with fixed losses over parameter-like tensors, against the
  oracle's three passes x1 = x + eps z, x2 = x1 - 2 eps z, x3 = (1 - lr wd)(x2 + eps z) - lr g z, each
  computed in float32 and rounded once (to nearest, or with the oracle's rounding bits of each pass);
* exact mode: one step of a tiny OPT (``fastmezo.patch(mode="exact")``) with its real losses: both
  losses against forwards with the oracle's W +- eps z, a step with lr = 0 leaves the stored weights
  bit-identical, and the update against the oracle's (1 - lr wd) theta - lr g z.

    python -m pytest -m gpu tests
"""
import pytest
import torch

import fastmezo
from fastmezo import oracle as R
from fastmezo.noise import rounding_seed

from conftest import HAS_CUDA, NORMAL_ATOL, ulp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

DEVICE = "cuda"
SEED = 0x5EED_1234_ABCD_0042
EPS = 1e-3
# Within 3 units in the last place: one rounding per pass, each may land one unit off because the
# backend's z may differ from the oracle's within NORMAL_ATOL and flip a rounding decision.
ULPS = 3
UPDATE_PASS = 2   # MeZO's pass index of the update (its stochastic-rounding bits)
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
ROUNDINGS = ["nearest", "stochastic"]


def _expected(x, z, passes, seed, key, stochastic):
    """The oracle's passes (a, b) applied to x in turn: x <- a x + b z, rounded once per pass."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) if stochastic else None
    for pass_index, (a, b) in passes:
        if index is None:
            x = R.pass_with_z(x, a, b, z)
        else:
            x = R.pass_with_z(x, a, b, z, R.rounding_bits_at(index, rounding_seed(seed, pass_index), key))
    return x


def _tolerance(expect, x, z, step, z_weight):
    """ULPS units in the last place of the result or of the largest intermediate |x| + step |z| (a z
    that differs in its last bits can flip the rounding of a perturbed value by one of *its* ulps, and
    that survives later passes even where the result is near zero), plus the normals' tolerance times
    the total weight of z over the passes."""
    scale = (x.float().abs() + step * z.abs()).to(x.dtype)
    return ULPS * torch.maximum(ulp(expect), ulp(scale)) + z_weight * NORMAL_ATOL * (1 + z.abs())


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_step_matches_the_oracle(dtype, rounding):
    lr, wd, losses = 1e-6, 0.1, (2.0, 1.0)   # lr * g = 5e-4: the update shows next to eps
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    start = [(torch.randn(shape, generator=gen, device=DEVICE) * 0.02).to(dtype)
             for shape in ((4096, 1024), (1024,), (3001, 7))]
    start.append(torch.ones(1024, device=DEVICE, dtype=dtype))           # a layer norm's weight
    params = [t.clone() for t in start]
    opt = fastmezo.MeZO(params, lr=lr, eps=EPS, weight_decay=wd, seed=SEED,
                        stochastic_rounding=rounding == "stochastic")
    values = iter(losses)
    opt.step(lambda: next(values))
    assert opt.skipped_steps == 0
    seed = fastmezo.derive_seed(SEED, 0)
    g = (losses[0] - losses[1]) / (2 * EPS)
    a = 1.0 - lr * wd
    passes = list(enumerate([(1.0, EPS), (1.0, -2 * EPS), (a, a * EPS - lr * g)]))
    stochastic = rounding == "stochastic" and dtype != torch.float32
    for key, (x, got) in enumerate(zip(start, params)):
        z = R.noise(x.numel(), seed, key, "gaussian", device=DEVICE).reshape(x.shape)
        expect = _expected(x, z, passes, seed, key, stochastic)
        err = (got.float() - expect.float()).abs()
        tol = _tolerance(expect, x, z, 2 * EPS, 4 * EPS)
        assert bool((err <= tol).all()), f"tensor {key}: max |diff| {err.max().item():.3g}"
        assert not torch.equal(got, x), f"tensor {key}: the step changed nothing"


def _tiny_opt(dtype):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024,
                       max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                       layerdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    return OPTForCausalLM(config).to(device=DEVICE, dtype=dtype).eval()


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_step_matches_the_oracle(dtype, rounding):
    from torch.func import functional_call

    # eps large enough that the two losses differ by far more than the loss tolerance (so a forward
    # that was not perturbed shows), lr large enough that the update moves float16 weights by many ulps.
    eps, lr, wd, loss_rtol = 0.05, 1e-3, 0.1, 2e-4
    model = _tiny_opt(dtype)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach().clone() for n, p in named}
    ids = torch.randint(2, model.config.vocab_size, (2, 16), generator=torch.Generator(device=DEVICE).manual_seed(1),
                        device=DEVICE)
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    with fastmezo.patch(model, mode="exact", lr=lr, eps=eps, weight_decay=wd, seed=SEED, keys="index",
                        stochastic_rounding=rounding == "stochastic") as handle:
        opt = handle.optimizer
        opt.step(lambda: model(**kwargs).loss)
        loss_plus, loss_minus = opt.loss_plus, opt.loss_minus
        after = {n: p.detach().clone() for n, p in named}
        for group in opt.param_groups:          # lr = 0: the forwards only read the stored weights
            group["lr"] = 0.0
        opt.step(lambda: model(**kwargs).loss)
        assert opt.skipped_steps == 0
        assert all(torch.equal(p, after[n]) for n, p in named), "a step with lr = 0 changed stored weights"
        groups = [(dict(g), list(g["param_names"])) for g in opt.param_groups]

    seed = fastmezo.derive_seed(SEED, 0)
    stochastic = rounding == "stochastic" and dtype != torch.float32
    perturbed = {1: {}, -1: {}}
    key = 0
    for group, names in groups:
        g = (loss_plus - loss_minus) / (2 * group["eps"])
        a, b = 1.0 - lr * group["weight_decay"], -lr * g
        for name in names:
            x, got = start[name], after[name]
            z = R.noise(x.numel(), seed, key, "gaussian", device=DEVICE).reshape(x.shape)
            for sign in (1, -1):
                perturbed[sign][name] = R.pass_with_z(x, 1.0, sign * eps, z)
            expect = _expected(x, z, [(UPDATE_PASS, (a, b))], seed, key, stochastic)
            err = (got.float() - expect.float()).abs()
            assert bool((err <= _tolerance(expect, x, z, abs(b), 4 * abs(b))).all()), \
                f"update of {name}: max |diff| {err.max().item():.3g}"
            key += 1
    assert any(not torch.equal(after[n], start[n]) for n in start), "the step changed none of the weights"

    with torch.no_grad():
        oracle = {sign: float(functional_call(model, perturbed[sign], (), kwargs).loss) for sign in (1, -1)}
    tol = {sign: loss_rtol * (1 + abs(oracle[sign])) for sign in (1, -1)}
    assert abs(oracle[1] - oracle[-1]) > 10 * max(tol.values()), "eps too small for the loss check"
    assert abs(loss_plus - oracle[1]) <= tol[1]
    assert abs(loss_minus - oracle[-1]) <= tol[-1]
