"""fastmezo.integrations.use_fastmezo on a stand-in of the paper's MeZO trainer.

The stand-in below follows the names and semantics of the reference trainer (zo_perturb_parameters,
zo_step, zo_update, named_parameters_to_optim, zo_random_seed, projected_grad, args.zo_eps, weight
decay skipped by name, lr scheduler stepped in zo_update). After the switch, a step must change the
weights exactly as the plain-torch MeZO formulas do with z taken from the noise oracle (seed =
zo_random_seed, key = position in named_parameters_to_optim)."""
import types

import numpy as np
import pytest
import torch

from fastmezo import reference as R
from fastmezo.integrations import use_fastmezo

pytestmark = [pytest.mark.usefixtures("single_thread"),
              # the stand-in drives its scheduler without optimizer steps, as the reference trainer does
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")]


class StandInTrainer:
    """The reference trainer's MeZO methods, written from the paper's algorithm (torch.normal noise)."""

    def __init__(self, model, lr=0.05, eps=1e-2, weight_decay=0.1):
        self.model = model
        self.args = types.SimpleNamespace(zo_eps=eps, weight_decay=weight_decay, learning_rate=lr)
        opt = torch.optim.SGD(model.parameters(), lr=lr)  # only to drive the scheduler, as HF does
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        self.named_parameters_to_optim = []

    def _get_learning_rate(self):
        return self.lr_scheduler.get_last_lr()[0]

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(random_seed if random_seed is not None else self.zo_random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            param.data = param.data + scaling_factor * z * self.args.zo_eps

    def zo_forward(self, model, inputs):
        model.eval()
        with torch.inference_mode():
            x, y = inputs
            return ((model(x) - y) ** 2).mean().detach()

    def zo_step(self, model, inputs):
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.zo_random_seed = int(np.random.randint(1000000000))
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(model, inputs)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(model, inputs)
        self.projected_grad = ((loss1 - loss2) / (2 * self.args.zo_eps)).item()
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self, model):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                param.data = param.data - self._get_learning_rate() * (self.projected_grad * z + self.args.weight_decay * param.data)
            else:
                param.data = param.data - self._get_learning_rate() * (self.projected_grad * z)
        self.lr_scheduler.step()


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    model[1].weight.requires_grad_(False)  # frozen: not in named_parameters_to_optim
    return model


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 6, generator=g), torch.randn(16, 2, generator=g)


def _loss(model, params, values, inputs):
    """The loss with the trainable parameters replaced by ``values`` (a plain functional forward)."""
    with torch.no_grad():
        saved = [p.clone() for _, p in params]
        for (_, p), v in zip(params, values):
            p.copy_(v)
        x, y = inputs
        loss = ((model(x) - y) ** 2).mean().item()
        for (_, p), s in zip(params, saved):
            p.copy_(s)
    return loss


def test_switched_step_matches_plain_mezo_with_oracle_noise():
    model, inputs = _model(), _data()
    trainer = StandInTrainer(model)
    use_fastmezo(trainer)
    np.random.seed(11)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    for step in range(3):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        theta = [p.detach().clone() for _, p in params]
        lr = trainer._get_learning_rate()
        trainer.zo_step(model, inputs)
        seed = trainer.zo_random_seed
        eps = trainer.args.zo_eps
        z = [R.noise(p.numel(), seed, i).view_as(p) for i, (_, p) in enumerate(params)]
        # the projected gradient from the losses at theta +- eps z (fp32 forward, tolerance for rounding)
        lp = _loss(model, params, [t + eps * zi for t, zi in zip(theta, z)], inputs)
        lm = _loss(model, params, [t - eps * zi for t, zi in zip(theta, z)], inputs)
        assert trainer.projected_grad == pytest.approx((lp - lm) / (2 * eps), rel=1e-3, abs=1e-4)
        trainer.zo_update(model)
        g = trainer.projected_grad
        for (name, p), t, zi in zip(params, theta, z):
            wd = 0.0 if ("bias" in name or "layer_norm" in name) else trainer.args.weight_decay
            want = t - lr * (g * zi + wd * t)
            torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)                      # torch's RNG never used
    assert torch.equal(model[1].weight, before["1.weight"])             # frozen stays
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.05 * 0.5 ** 3)  # scheduler stepped


def test_layer_norm_names_skip_weight_decay():
    """With projected_grad 0 the update is pure weight decay: only parameters without bias/layer_norm in
    their name shrink, by (1 - lr * wd)."""
    model = _model()
    trainer = StandInTrainer(model, lr=0.5, weight_decay=0.2)
    trainer.named_parameters_to_optim = [("layer_norm.w", model[1].bias), ("fc.weight", model[0].weight),
                                         ("fc.bias", model[0].bias)]
    trainer.zo_random_seed, trainer.projected_grad = 5, 0.0
    use_fastmezo(trainer)
    before = [p.detach().clone() for _, p in trainer.named_parameters_to_optim]
    trainer.zo_update(model)
    after = [p.detach() for _, p in trainer.named_parameters_to_optim]
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    torch.testing.assert_close(after[1], before[1] * (1 - 0.5 * 0.2), rtol=1e-6, atol=0)


def test_remove_restores_the_trainers_own_methods_and_patching_twice_is_refused():
    model = _model()
    trainer = StandInTrainer(model)
    handle = use_fastmezo(trainer)
    with pytest.raises(RuntimeError, match="already uses fastmezo"):
        use_fastmezo(trainer)
    handle.remove()
    handle.remove()  # idempotent
    assert "zo_perturb_parameters" not in vars(trainer) and not hasattr(trainer, "_fastmezo_frontend")
    # the original semantics are back: the perturbation is torch.normal's
    trainer.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainer.zo_random_seed = 7
    p0 = model[0].weight.detach().clone()
    trainer.zo_perturb_parameters(scaling_factor=1)
    torch.manual_seed(7)
    z = torch.normal(mean=0, std=1, size=p0.size())
    torch.testing.assert_close(model[0].weight.detach(), p0 + z * trainer.args.zo_eps)
    assert isinstance(use_fastmezo(trainer), object)  # can switch again after remove


def test_rejects_objects_without_the_interface():
    with pytest.raises(TypeError, match="zo_perturb_parameters"):
        use_fastmezo(types.SimpleNamespace(args=None))
