"""fastmezo.integrations.use_fastmezo on trainers with the structure and behaviour of the paper's and
ZO-Bench's MeZO trainers (tests/zo_trainers.py).

The semantics check: the same trainer runs twice from the same weights and numpy seed, once with its
own code and z replaced by fastmezo's z through the plain-torch oracle (zo_trainers.fastmezo_z), once
switched to fastmezo's passes; seeds, projected gradients, losses and weights must agree for every
supported mode. Every unsupported mode is refused with the option named and the trainer untouched.

Tolerances, from the largest differences measured over 5 seeds of every supported mode (fp32, eps
1e-2, lr 0.03, 3 steps; the native backend's z differs from the float64 oracle's by ~1e-5 per unit
of |z|, docs/noise.md, and forwards at weights a few ulp apart differ by rounding): weights 2.9e-6
apart, projected gradients 2.4e-5 relative to max(1, |g|); asserted at 1e-5 and 1e-4. A step that
fails is walked back by opposite passes: weights within 1e-6 of their start (a few float32 ulp).
"""
import re

import numpy as np
import pytest
import torch

import zo_trainers as Z
from fastmezo import functional as _functional
from fastmezo import oracle as R
from fastmezo.integrations import use_fastmezo

pytestmark = [pytest.mark.usefixtures("single_thread"),
              # the trainers step their scheduler without the HF optimizer stepping, as the real ones do
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")]

WEIGHT_ATOL = 1e-5
RESTORE_ATOL = 1e-6

SUPPORTED = {
    "paper, wd 0.1, linear lr": (Z.PaperTrainer, dict(weight_decay=0.1, lr_scheduler_type="linear")),
    "zo_sgd q=1": (Z.ZOBenchTrainer, dict()),
    "zo_sgd q=1 one_side": (Z.ZOBenchTrainer, dict(perturbation_mode="one_side")),
    "zo_sgd q=3": (Z.ZOBenchTrainer, dict(q=3)),
    "zo_sgd q=2 one_side": (Z.ZOBenchTrainer, dict(q=2, perturbation_mode="one_side")),
    "zo_sign_opt sgd q=1": (Z.ZOBenchTrainer, dict(trainer="zo_sign_opt", optimizer="sgd")),
    "zo_sign_opt sgd q=2": (Z.ZOBenchTrainer, dict(trainer="zo_sign_opt", optimizer="sgd", q=2)),
}


def _trainer(kind, **options):
    make_args = Z.paper_args if kind is Z.PaperTrainer else Z.zo_bench_args
    return kind(Z.TinyRegressor(), make_args(**{"zo_eps": 1e-2, "learning_rate": 0.03, **options}))


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def _assert_weights(trainer, expected, atol=WEIGHT_ATOL):
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=atol, msg=name)


def _loss_at(model, params, values, batch):
    """The loss with the trained parameters set to ``values``; the parameters are put back after."""
    with torch.no_grad():
        saved = [p.clone() for _, p in params]
        for (_, p), v in zip(params, values):
            p.copy_(v)
        loss = model(**batch).loss.item()
        for (_, p), v in zip(params, saved):
            p.copy_(v)
    return loss


@pytest.mark.parametrize("mode", SUPPORTED)
def test_switched_trainer_runs_the_trainers_algorithm_along_fastmezos_z(mode):
    kind, options = SUPPORTED[mode]
    batches = Z.regression_batches(3)
    original, switched = _trainer(kind, **options), _trainer(kind, **options)
    start = _weights(switched)
    np.random.seed(5)
    with Z.fastmezo_z():
        want = original.train(batches)
    use_fastmezo(switched)
    np.random.seed(5)
    torch_rng = torch.get_rng_state()
    got = switched.train(batches)

    assert torch.equal(torch.get_rng_state(), torch_rng)       # torch's generator never drew z
    assert [s for s, _ in switched.history] == [s for s, _ in original.history]
    for (_, g_got), (_, g_want) in zip(switched.history, original.history):
        assert g_got == pytest.approx(g_want, rel=1e-4, abs=1e-4)
    assert got == pytest.approx(want, rel=1e-5)
    _assert_weights(switched, _weights(original))
    moved = {n for n, p in switched.model.named_parameters() if not torch.equal(p, start[n])}
    assert moved == {n for n, p in switched.model.named_parameters() if p.requires_grad}


def test_zo_bench_update_uses_each_parameters_optimizer_group():
    """The update goes through trainer.optimizer: each parameter moves with its group's lr, and a
    parameter the optimizer does not hold is perturbed and restored but not updated."""
    (batch,) = Z.regression_batches(1)
    original, switched = _trainer(Z.ZOBenchTrainer), _trainer(Z.ZOBenchTrainer)
    for trainer in (original, switched):
        m = trainer.model
        trainer.optimizer = torch.optim.SGD([{"params": [m.fc1.weight], "lr": 0.2},
                                             {"params": [m.fc2.weight, m.fc2.bias], "lr": 0.05}])
        trainer.sparse_grad_rng, trainer.sparse_grad_random_seed = torch.Generator(), 0
        trainer.gradient_sparsity = None
    start = _weights(switched)
    np.random.seed(4)
    with Z.fastmezo_z():
        original.zo_step(original.model, batch)
    use_fastmezo(switched)
    np.random.seed(4)
    switched.zo_step(switched.model, batch)
    _assert_weights(switched, _weights(original))
    for name in ("fc1.bias", "layer_norm.bias"):
        torch.testing.assert_close(switched.model.get_parameter(name), start[name], rtol=0,
                                   atol=RESTORE_ATOL)
    assert not torch.equal(switched.model.fc1.weight, start["fc1.weight"])


def test_zo_bench_q_directions_are_averaged_into_one_update():
    """q = 2: theta moves by -lr/2 * (g1 z(s1) + g2 z(s2)), every loss taken at theta +- eps z_i."""
    trainer = _trainer(Z.ZOBenchTrainer, q=2)
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    theta = [p.detach().clone() for _, p in params]
    use_fastmezo(trainer)
    (batch,) = Z.regression_batches(1)
    forwards = []
    real_forward = trainer.zo_forward

    def forward(model, inputs):
        forwards.append([p.detach().clone() for _, p in params])
        return real_forward(model, inputs)

    trainer.zo_forward = forward
    np.random.seed(2)
    # the loop draws sparse_grad_random_seed first, then one seed per direction
    seeds = [int(np.random.randint(1000000000)) for _ in range(3)][1:]
    np.random.seed(2)
    trainer.train([batch])
    z = {s: [R.noise(t.numel(), s, i).view_as(t) for i, t in enumerate(theta)] for s in seeds}
    eps = trainer.args.zo_eps
    for k, (seed, sign) in enumerate([(seeds[0], 1), (seeds[0], -1), (seeds[1], 1), (seeds[1], -1)]):
        for w, t, zi in zip(forwards[k], theta, z[seed]):
            torch.testing.assert_close(w, t + sign * eps * zi, rtol=0, atol=RESTORE_ATOL)
    g = []
    for seed in seeds:
        lp = _loss_at(trainer.model, params, [t + eps * zi for t, zi in zip(theta, z[seed])], batch)
        lm = _loss_at(trainer.model, params, [t - eps * zi for t, zi in zip(theta, z[seed])], batch)
        g.append((lp - lm) / (2 * eps))
    assert trainer.projected_grad == pytest.approx(g[1], rel=1e-3, abs=1e-4)
    lr = trainer.args.learning_rate
    for (_, p), t, z1, z2 in zip(params, theta, z[seeds[0]], z[seeds[1]]):
        torch.testing.assert_close(p.detach(), t - lr / 2 * (g[0] * z1 + g[1] * z2), rtol=1e-4, atol=1e-6)


def test_paper_update_skips_weight_decay_on_bias_and_layer_norm_names():
    """With projected_grad 0, zo_update is pure weight decay: only names without bias / layer_norm /
    layernorm shrink, by (1 - lr * wd); the scheduler steps."""
    trainer = _trainer(Z.PaperTrainer, weight_decay=0.2, learning_rate=0.5, lr_scheduler_type="linear")
    trainer.create_optimizer_and_scheduler(4)
    m = trainer.model
    trainer.named_parameters_to_optim = [("encoder.layernorm.bias", m.layer_norm.bias),
                                         ("fc1.weight", m.fc1.weight), ("fc1.bias", m.fc1.bias)]
    trainer.zo_random_seed, trainer.projected_grad = 5, 0.0
    use_fastmezo(trainer)
    before = [p.detach().clone() for _, p in trainer.named_parameters_to_optim]
    trainer.zo_update(m)
    after = [p.detach() for _, p in trainer.named_parameters_to_optim]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    torch.testing.assert_close(after[1], before[1] * (1 - 0.5 * 0.2), rtol=1e-6, atol=0)
    assert trainer._get_learning_rate() == pytest.approx(0.5 * 3 / 4)


# -- refusals ------------------------------------------------------------------------------------

UNSUPPORTED = [
    (Z.ZOBenchTrainer, dict(trainer="zo_adam"), "args.trainer='zo_adam'"),
    (Z.ZOBenchTrainer, dict(trainer="zo_conserv"), "args.trainer='zo_conserv'"),
    (Z.ZOBenchTrainer, dict(trainer="forward_grad"), "args.trainer='forward_grad'"),
    (Z.ZOBenchTrainer, dict(trainer="regular"), "args.trainer='regular'"),
    (Z.ZOBenchTrainer, dict(momentum=0.9), "args.momentum=0.9"),
    (Z.ZOBenchTrainer, dict(trainer="zo_sign_opt"), "args.optimizer='adamw'"),
    (Z.ZOBenchTrainer, dict(trainer="zo_sign_opt", optimizer="adam"), "args.optimizer='adam'"),
    (Z.ZOBenchTrainer, dict(gradient_sparsity=0.75), "args.gradient_sparsity=0.75"),
    (Z.ZOBenchTrainer, dict(module_wise_perturbation=True), "args.module_wise_perturbation=True"),
    (Z.ZOBenchTrainer, dict(gradient_accumulation_steps=2), "args.gradient_accumulation_steps=2"),
    (Z.ZOBenchTrainer, dict(q=0), "args.q"),
    (Z.ZOBenchTrainer, dict(q=2.0), "args.q"),
    (Z.ZOBenchTrainer, dict(zo_eps="1e-3"), "args.zo_eps"),
    (Z.ZOBenchTrainer, dict(zo_eps=True), "args.zo_eps"),
    (Z.ZOBenchTrainer, dict(zo_eps=0.0), "args.zo_eps"),
    (Z.ZOBenchTrainer, dict(momentum="0"), "args.momentum"),
    (Z.PaperTrainer, dict(trainer="none"), "args.trainer='none'"),
    (Z.PaperTrainer, dict(gradient_accumulation_steps=4), "args.gradient_accumulation_steps=4"),
    (Z.PaperTrainer, dict(zo_eps="1e-3"), "args.zo_eps"),
    (Z.PaperTrainer, dict(weight_decay="0.1"), "args.weight_decay"),
]


def _state(trainer):
    return dict(vars(trainer)), _weights(trainer)


def _assert_untouched(trainer, state):
    attributes, weights = state
    assert vars(trainer).keys() == attributes.keys()
    assert all(vars(trainer)[k] is v for k, v in attributes.items())
    _assert_weights(trainer, weights, atol=0)


@pytest.mark.parametrize("kind, options, named", UNSUPPORTED,
                         ids=[f"{k.__name__}-{n}" for k, _, n in UNSUPPORTED])
def test_unsupported_modes_are_refused_naming_the_option_and_leave_the_trainer_untouched(
        kind, options, named):
    trainer = _trainer(kind, **options)
    state = _state(trainer)
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        use_fastmezo(trainer)
    _assert_untouched(trainer, state)


class ZOBenchWithAnotherStep(Z.ZOBenchTrainer):
    def zo_step_v3(self, model, inputs):
        return self.zo_step(model, inputs)


class ZOBenchWithItsOwnNoise(Z.ZOBenchTrainer):
    def sample_direction(self, param):
        return torch.randn_like(param)


class ZOBenchWithThePapersUpdate(Z.ZOBenchTrainer):
    """ZO-Bench's step (which updates) with the paper's zo_update (which updates again): the double
    update the adapter used to run."""
    zo_update = Z.PaperTrainer.zo_update


class PaperWithZOInTrainingStep(Z.PaperTrainer):
    def training_step(self, model, inputs):
        return self.zo_step(model, inputs)


@pytest.mark.parametrize("kind, named", [(ZOBenchWithAnotherStep, "zo_step_v3"),
                                         (ZOBenchWithItsOwnNoise, "sample_direction"),
                                         (ZOBenchWithThePapersUpdate, "zo_update"),
                                         (PaperWithZOInTrainingStep, "training_step")])
def test_unknown_methods_that_may_draw_z_are_refused(kind, named):
    base = Z.PaperTrainer if issubclass(kind, Z.PaperTrainer) else Z.ZOBenchTrainer
    make_args = Z.paper_args if base is Z.PaperTrainer else Z.zo_bench_args
    trainer = kind(Z.TinyRegressor(), make_args())
    state = _state(trainer)
    with pytest.raises(ValueError, match=named):
        use_fastmezo(trainer)
    _assert_untouched(trainer, state)


def test_objects_without_the_interface_are_refused():
    with pytest.raises(TypeError, match="zo_perturb_parameters"):
        use_fastmezo(type("NotATrainer", (), {"args": Z.paper_args()})())


@pytest.mark.parametrize("change, error, named", [
    (lambda t: setattr(t.args, "zo_eps", "1e-3"), TypeError, "args.zo_eps"),
    (lambda t: setattr(t.args, "trainer", "zo_adam"), ValueError, "args.trainer='zo_adam'"),
    (lambda t: setattr(t.args, "q", True), TypeError, "args.q"),
    (lambda t: setattr(t, "optimizer", torch.optim.Adam(t.model.parameters())), ValueError, "Adam"),
    (lambda t: setattr(t, "optimizer", torch.optim.SGD(t.model.parameters(), lr=0.1, momentum=0.5)),
     ValueError, "'momentum'"),
    (lambda t: t.optimizer.param_groups[0].update(lr="0.1"), TypeError, "param_groups[0]['lr']"),
])
def test_options_changed_after_switching_are_refused_before_anything_moves(change, error, named):
    trainer = _trainer(Z.ZOBenchTrainer)
    trainer.create_optimizer_and_scheduler(1)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    trainer.sparse_grad_random_seed = 0
    use_fastmezo(trainer)
    change(trainer)
    before, numpy_rng = _weights(trainer), np.random.get_state()[1].copy()
    with pytest.raises(error, match=re.escape(named)):
        trainer.zo_step(trainer.model, Z.regression_batches(1)[0])
    _assert_weights(trainer, before, atol=0)
    assert np.array_equal(np.random.get_state()[1], numpy_rng)     # no seed drawn either


def test_methods_of_refused_modes_cannot_run_while_switched():
    trainer = _trainer(Z.ZOBenchTrainer)
    use_fastmezo(trainer)
    before = _weights(trainer)
    trainer.args.trainer = "zo_conserv"           # the loop would now call zo_conserv_step
    with pytest.raises(ValueError, match="args.trainer='zo_conserv'"):
        trainer.train(Z.regression_batches(1))
    trainer.args.trainer = "zo_sgd"
    for name in ("zo_conserv_step", "forward_grad_step", "zo_step_with_module_wise_perturbation"):
        with pytest.raises(RuntimeError, match=name):
            getattr(trainer, name)(trainer.model, Z.regression_batches(1)[0])
    _assert_weights(trainer, before, atol=0)


# -- transactions --------------------------------------------------------------------------------

def _failing_forward(trainer, fail_at, error=RuntimeError):
    calls = {"n": 0}
    forward = trainer.zo_forward

    def zo_forward(model, inputs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise error("forward failed")
        return forward(model, inputs)

    trainer.zo_forward = zo_forward


@pytest.mark.parametrize("mode, fail_at", [("paper, wd 0.1, linear lr", 1), ("paper, wd 0.1, linear lr", 2),
                                           ("zo_sgd q=1", 2), ("zo_sgd q=3", 5),
                                           ("zo_sgd q=2 one_side", 4)])
def test_a_step_whose_forward_raises_leaves_the_weights_where_they_started(mode, fail_at):
    kind, options = SUPPORTED[mode]
    trainer = _trainer(kind, **options)
    use_fastmezo(trainer)
    start = _weights(trainer)
    for _ in range(3):                               # retries do not accumulate
        _failing_forward(trainer, fail_at, error=KeyboardInterrupt if fail_at == 2 else RuntimeError)
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            trainer.train(Z.regression_batches(1))
        _assert_weights(trainer, start, atol=RESTORE_ATOL)
        del trainer.zo_forward


def test_a_step_whose_update_pass_raises_is_undone(monkeypatch):
    """q = 2: the last direction's fused restore+update has run when the other direction's update
    pass fails; the adapter walks both back."""
    trainer = _trainer(Z.ZOBenchTrainer, q=2)
    use_fastmezo(trainer)
    start = _weights(trainer)
    real_update = _functional.update_
    calls = {"n": 0}

    def update_(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("backend failed")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(_functional, "update_", update_)
    with pytest.raises(RuntimeError, match="backend failed"):
        trainer.train(Z.regression_batches(1))
    _assert_weights(trainer, start, atol=RESTORE_ATOL)


def test_remove_gives_the_trainer_its_own_methods_back():
    trainer = _trainer(Z.ZOBenchTrainer)
    own = set(vars(trainer))
    handle = use_fastmezo(trainer)
    assert {"zo_step", "zo_step_v1", "zo_perturb_parameters", "zo_conserv_step"} <= set(vars(trainer))
    with pytest.raises(RuntimeError, match="already uses fastmezo"):
        use_fastmezo(trainer)
    handle.remove()
    handle.remove()                                  # idempotent
    assert set(vars(trainer)) == own
    # its own algorithm is back: a run equals the unswitched trainer's with torch's z
    reference = _trainer(Z.ZOBenchTrainer)
    np.random.seed(1)
    reference.train(Z.regression_batches(2))
    np.random.seed(1)
    trainer.train(Z.regression_batches(2))
    _assert_weights(trainer, _weights(reference), atol=0)
    use_fastmezo(trainer).remove()                   # can switch again after remove


def test_switched_zo_bench_trainer_trains_a_tiny_opt():
    """200 steps of ZO-SGD on one fixed batch of a randomly initialised OPT lower its loss."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=2, max_position_embeddings=32,
                                    word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    model = transformers.OPTForCausalLM(config)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = dict(input_ids=ids, labels=ids)
    trainer = Z.ZOBenchTrainer(model, Z.zo_bench_args(learning_rate=3e-3, zo_eps=1e-3))
    use_fastmezo(trainer)
    start = trainer.zo_forward(model, batch).item()
    np.random.seed(0)
    trainer.train([batch] * 200)
    end = trainer.zo_forward(model, batch).item()
    assert end < start - 0.15, (start, end)


def test_a_non_finite_loss_is_refused_with_the_weights_restored():
    trainer = _trainer(Z.ZOBenchTrainer)
    use_fastmezo(trainer)
    start = _weights(trainer)
    forward = trainer.zo_forward
    trainer.zo_forward = lambda model, inputs: forward(model, inputs) * float("nan")
    with pytest.raises(ValueError, match="projected_grad must be finite"):
        trainer.train(Z.regression_batches(1))
    _assert_weights(trainer, start, atol=RESTORE_ATOL)


def test_perturbation_seeds_must_be_ints():
    trainer = _trainer(Z.PaperTrainer)
    use_fastmezo(trainer)
    trainer.named_parameters_to_optim = list(trainer.model.named_parameters())
    before = _weights(trainer)
    with pytest.raises(TypeError, match="random_seed must be a non-negative int, got '5'"):
        trainer.zo_perturb_parameters(random_seed="5")
    _assert_weights(trainer, before, atol=0)
    trainer.zo_perturb_parameters(random_seed=np.int64(5), scaling_factor=1)    # numpy's ints are ints
    z = R.noise(trainer.model.fc1.weight.numel(), 5, 0).view_as(before["fc1.weight"])
    torch.testing.assert_close(trainer.model.fc1.weight.detach(), before["fc1.weight"] + 1e-2 * z,
                               rtol=0, atol=RESTORE_ATOL)
