"""fastmezo.variants.MeZOVariant (n-SPSA, momentum by replay, one-sided estimates) against plain-torch
implementations that materialize every z (fastmezo.oracle.noise) and keep theta in float64.

The variant runs in float32 on the oracle backend; the references in float64. They differ by the
float32 rounding of the weights (and, in place, of the perturb/restore passes), which the projected
gradient divides by eps: tolerance 2e-6 absolute on weights that move by about 0.5 in 40 steps, ten
times float32's rounding of such weights; each test also checks that the variant's result is far
(> 100x the tolerance) from what plain MeZO would give."""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F

import fastmezo
from fastmezo import derive_seed, key_from_name, oracle
from fastmezo.exact import ExactPerturbation
from fastmezo.variants import MeZOVariant

TOL = 2e-6
LR, EPS, WD, SEED = 0.05, 1e-2, 0.02, 11


def _problem(kind):
    """A logistic regression or a least-squares problem on nn.Linear(6, 1), nonzero data."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    if kind == "logistic":
        y = (x @ torch.linspace(-1, 1, 6, dtype=torch.float64) > 0).double()
        loss = lambda logits: F.binary_cross_entropy_with_logits(logits.reshape(-1), y)  # noqa: E731
    else:
        y = x @ torch.linspace(0.5, -0.5, 6, dtype=torch.float64) + 0.3
        loss = lambda out: 0.5 * ((out.reshape(-1) - y) ** 2).mean()  # noqa: E731
    torch.manual_seed(5)
    return torch.nn.Linear(6, 1), x, loss


def _reference(model, x, loss_of, steps, q=1, momentum=0.0, window=1, one_sided=False):
    """The variant's update with explicit z, theta in float64 (weight decay on the weight only)."""
    theta = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    decay = {"weight": WD, "bias": 0.0}
    history = collections.deque(maxlen=window)

    def loss(params):
        return loss_of(x @ params["weight"].T + params["bias"]).item()

    for t in range(steps):
        seeds = [derive_seed(SEED, t, j) for j in range(q)]
        z = {s: {n: oracle.noise(v.numel(), s, key_from_name(n)).double().reshape(v.shape) for n, v in theta.items()}
             for s in seeds}
        l0 = loss(theta)
        entry = []
        for s in seeds:
            plus = loss({n: v + EPS * z[s][n] for n, v in theta.items()})
            if one_sided:
                g = (plus - l0) / EPS
            else:
                g = (plus - loss({n: v - EPS * z[s][n] for n, v in theta.items()})) / (2 * EPS)
            entry.append((s, g / q))
        history.append(entry)
        update = {n: torch.zeros_like(v) for n, v in theta.items()}
        for k, past in enumerate(reversed(history)):
            for s, gq in past:
                z_s = z.get(s) or {n: oracle.noise(v.numel(), s, key_from_name(n)).double().reshape(v.shape)
                                   for n, v in theta.items()}
                for n in theta:
                    update[n] += momentum ** k * gq * z_s[n]
        theta = {n: (1 - LR * decay[n]) * v - LR * update[n] for n, v in theta.items()}
    return theta


def _run(kind, steps, mode="inplace", **options):
    model, x, loss_of = _problem(kind)
    start = copy.deepcopy(model)
    extra = dict(perturbation=ExactPerturbation(model)) if mode == "exact" else {}
    opt = MeZOVariant(fastmezo.param_groups(model, WD), lr=LR, eps=EPS, seed=SEED, backend="oracle",
                      **extra, **options)
    closure = lambda: loss_of(model(x.float()).double())  # noqa: E731
    first = closure().item()
    for _ in range(steps):
        opt.step(closure)
    assert not opt.state and all(isinstance(g, float) for e in opt.history for _, gq in e for g in gq)
    assert closure().item() < first                       # the variant trains
    return start, model, x, loss_of, opt


def _assert_close(model, theta, start, x, loss_of):
    for n, p in model.named_parameters():
        assert (p.detach().double() - theta[n]).abs().max().item() < TOL, n
    plain = _reference(start, x, loss_of, 40)
    assert max((plain[n] - p.detach().double()).abs().max().item() for n, p in model.named_parameters()) > 100 * TOL


@pytest.mark.parametrize("mode", ["inplace", "exact"])
def test_n_spsa_matches_the_reference(mode):
    start, model, x, loss_of, opt = _run("logistic", 40, mode, directions=4)
    assert len(opt.history) == 1 and len(opt.history[0]) == 4
    _assert_close(model, _reference(start, x, loss_of, 40, q=4), start, x, loss_of)


def test_momentum_by_replay_matches_the_reference():
    start, model, x, loss_of, opt = _run("quadratic", 40, momentum=0.8, window=5)
    assert len(opt.history) == 5
    _assert_close(model, _reference(start, x, loss_of, 40, momentum=0.8, window=5), start, x, loss_of)


@pytest.mark.parametrize("mode", ["inplace", "exact"])
def test_one_sided_matches_the_reference(mode):
    start, model, x, loss_of, opt = _run("logistic", 40, mode, one_sided=True, directions=2)
    _assert_close(model, _reference(start, x, loss_of, 40, q=2, one_sided=True), start, x, loss_of)


def test_a_non_finite_loss_skips_the_step_and_restores_the_weights():
    model, x, loss_of = _problem("logistic")
    opt = MeZOVariant(fastmezo.param_groups(model, WD), lr=LR, eps=EPS, seed=SEED, directions=3, momentum=0.5,
                      window=2, backend="oracle")
    before = copy.deepcopy(model)
    calls = []

    def closure():
        calls.append(1)
        return float("nan") if len(calls) == 4 else loss_of(model(x.float()).double())

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(closure)
    assert opt.skipped_steps == 1 and not opt.history
    for p, q in zip(model.parameters(), before.parameters()):
        assert (p - q).abs().max().item() < 1e-6             # restored (in place: up to rounding)


@pytest.mark.parametrize("bad, message", [(dict(directions=0), "directions"), (dict(window=1.5), "window"),
                                          (dict(momentum=1.0), "momentum"), (dict(trajectory=True), "trajectory")])
def test_bad_options_are_refused(bad, message):
    model, _, _ = _problem("logistic")
    with pytest.raises(ValueError, match=message):
        MeZOVariant(model.parameters(), lr=LR, **bad)
