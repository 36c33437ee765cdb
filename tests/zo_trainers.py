"""Two MeZO trainers for the tests of fastmezo.integrations.use_fastmezo, written for these tests with the
structure and behaviour of the real ones (docs/frontends.md tables them):

* ``PaperTrainer``: princeton-nlp/MeZO large_models/trainer.py. ``zo_step`` draws the seed with
  np.random.randint, perturbs +1/-2/+1 eps along z (torch.manual_seed + torch.normal per parameter) and
  sets ``projected_grad``; ``zo_update`` regenerates z and applies the update with weight decay skipped
  by name, then steps the scheduler. The loop calls zo_step then zo_update when ``args.trainer == "zo"``.
* ``ZOBenchTrainer``: ZO-Bench/ZO-LLM zo-bench/trainer.py. The loop builds its own optimizer from
  ``args.trainer`` (SGD with ``args.momentum`` for zo_sgd, Adam for zo_adam, ``args.optimizer``
  otherwise), draws ``sparse_grad_random_seed`` every ``sparse_gradient_resample_steps`` and dispatches:
  module-wise, q == 1 (``zo_step``), q > 1 (``zo_step_v1``), zo_conserv, forward_grad. The step methods
  apply the update themselves (``param.grad = c * z / q``; ``optimizer.step()``), with sparse masks on z,
  one- or two-sided estimates, sign(projected_grad) for zo_sign_opt; ``zo_update`` only steps the
  scheduler.

Both lean on ``MiniHFTrainer``, the few parts of transformers.Trainer they use. ``fastmezo_z()`` is the
plain-torch oracle of the switched semantics: while it is active, torch.manual_seed + torch.normal
(as the trainers call them) return fastmezo's z from fastmezo.oracle, key = draw index since the
last manual_seed, which is the parameter's position in named_parameters_to_optim.
"""
from __future__ import annotations

import contextlib
import types
from unittest import mock

import numpy as np
import torch

from fastmezo import oracle as R


def paper_args(**overrides):
    """The fields of the paper's OurArguments that its MeZO code reads."""
    fields = dict(trainer="zo", zo_eps=1e-3, learning_rate=1e-2, weight_decay=0.0,
                  gradient_accumulation_steps=1, lr_scheduler_type="constant", non_diff=False, n_gpu=1)
    return types.SimpleNamespace(**{**fields, **overrides})


def zo_bench_args(**overrides):
    """The fields of ZO-Bench's OurArguments that its MeZO code reads, with its defaults."""
    fields = dict(trainer="zo_sgd", optimizer="adamw", momentum=0.0, zo_eps=1e-3, q=1,
                  perturbation_mode="two_side", learning_rate=1e-2, weight_decay=0.0,
                  gradient_accumulation_steps=1, lr_scheduler_type="constant", non_diff=False, n_gpu=1,
                  gradient_sparsity=None, sparse_gradient_resample_steps=1, sparse_gradient_group="layer",
                  module_wise_perturbation=False, perturbed_module_level="transformer-block",
                  coordinate_perturbation=False)
    return types.SimpleNamespace(**{**fields, **overrides})


class MiniHFTrainer:
    """What the MeZO trainers take from transformers.Trainer: model, args, an optimizer and lr
    scheduler made at train time, compute_loss, _get_learning_rate."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.history = []          # (zo_random_seed, projected_grad) of every step, as a log would keep

    def create_optimizer_and_scheduler(self, num_training_steps):
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=self.args.learning_rate)
        if self.args.lr_scheduler_type == "linear":
            decay = lambda step: max(0.0, 1 - step / num_training_steps)  # noqa: E731
        else:
            decay = lambda step: 1.0  # noqa: E731
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, decay)

    def _get_learning_rate(self):
        return self.lr_scheduler.get_last_lr()[0]

    def _prepare_inputs(self, inputs):
        return inputs

    def compute_loss_context_manager(self):
        return contextlib.nullcontext()

    def compute_loss(self, model, inputs):
        return model(**inputs).loss

    def zo_forward(self, model, inputs):
        """The loss without gradients, dropout off."""
        model.eval()
        with torch.inference_mode():
            inputs = self._prepare_inputs(inputs)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
        return loss.detach()


class PaperTrainer(MiniHFTrainer):
    """The MeZO methods of the paper's trainer."""

    def train(self, batches):
        self.create_optimizer_and_scheduler(len(batches))
        losses = []
        for inputs in batches:
            if self.args.trainer != "zo":
                raise NotImplementedError("this test trainer runs the ZO mode only")
            losses.append(self.zo_step(self.model, inputs).item())
            self.zo_update(self.model)
            self.history.append((int(self.zo_random_seed), self.projected_grad))
        return losses

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(self.zo_random_seed if random_seed is None else random_seed)
        for _, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            param.data = param.data + scaling_factor * self.args.zo_eps * z

    def zo_step(self, model, inputs):
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.zo_random_seed = np.random.randint(1000000000)
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(model, inputs)
        self.zo_perturb_parameters(scaling_factor=-2)
        loss2 = self.zo_forward(model, inputs)
        self.projected_grad = ((loss1 - loss2) / (2 * self.args.zo_eps)).item()
        assert self.args.gradient_accumulation_steps == 1
        self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def zo_update(self, model):
        torch.manual_seed(self.zo_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            decay = 0.0 if ("bias" in name or "layer_norm" in name or "layernorm" in name) \
                else self.args.weight_decay
            step = self._get_learning_rate() * (self.projected_grad * z + decay * param.data)
            param.data = param.data - step
        self.lr_scheduler.step()


def random_mask_like(tensor, ratio, generator):
    """ZO-Bench's cheap random mask: True where a normal draw of ``generator`` is below ``ratio``."""
    return torch.empty_like(tensor).normal_(generator=generator) < ratio


class ZOBenchTrainer(MiniHFTrainer):
    """The MeZO methods of ZO-Bench's trainer."""

    def train(self, batches):
        args = self.args
        self.create_optimizer_and_scheduler(len(batches))
        params = self.model.parameters()
        if args.trainer == "zo_adam":
            self.optimizer = torch.optim.Adam(params, lr=args.learning_rate)
        elif args.trainer == "zo_sgd" or args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=args.learning_rate, momentum=args.momentum)
        elif args.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=args.learning_rate)
        self.sparse_grad_rng = torch.Generator()
        self.gradient_sparsity = args.gradient_sparsity
        losses = []
        for step, inputs in enumerate(batches):
            if step % args.sparse_gradient_resample_steps == 0:
                self.sparse_grad_random_seed = np.random.randint(1000000000)
            if args.trainer in ("zo_sgd", "zo_adam", "zo_sign_opt"):
                if args.module_wise_perturbation:
                    loss = self.zo_step_with_module_wise_perturbation(self.model, inputs)
                elif args.q == 1:
                    loss = self.zo_step(self.model, inputs)
                elif args.q > 1:
                    loss = self.zo_step_v1(self.model, inputs)
                else:
                    raise ValueError(f"q={args.q} is not supported.")
            elif args.trainer == "zo_conserv":
                loss = self.zo_conserv_step(self.model, inputs)
            elif args.trainer == "forward_grad":
                loss = self.forward_grad_step(self.model, inputs)
            else:
                raise NotImplementedError("this test trainer runs the ZO modes only")
            losses.append(float(loss))
            self.history.append((int(self.zo_random_seed), getattr(self, "projected_grad", None)))
            if args.trainer == "forward_grad":
                self.forward_grad_update(self.model)
            else:
                self.zo_update(self.model)
        return losses

    def get_grad_sparsity_by_name(self, name):
        if isinstance(self.gradient_sparsity, dict):
            return self.gradient_sparsity[name]
        return self.gradient_sparsity

    def zo_perturb_parameters(self, random_seed=None, scaling_factor=1):
        torch.manual_seed(self.zo_random_seed if random_seed is None else random_seed)
        self.sparse_grad_rng.manual_seed(self.sparse_grad_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            sparsity = self.get_grad_sparsity_by_name(name)
            if sparsity is not None:
                z[random_mask_like(z, sparsity, self.sparse_grad_rng)] = 0
            param.data = param.data + scaling_factor * z * self.args.zo_eps

    def _estimate(self, model, inputs):
        """+eps: loss1; then -eps (one-sided, ends at theta) or -2 eps and +eps back (two-sided)."""
        self.zo_perturb_parameters(scaling_factor=1)
        loss1 = self.zo_forward(model, inputs)
        if self.args.perturbation_mode == "one_side":
            self.zo_perturb_parameters(scaling_factor=-1)
            loss2 = self.zo_forward(model, inputs)
            self.projected_grad = ((loss1 - loss2) / self.args.zo_eps).item()
        else:
            self.zo_perturb_parameters(scaling_factor=-2)
            loss2 = self.zo_forward(model, inputs)
            self.projected_grad = ((loss1 - loss2) / (2 * self.args.zo_eps)).item()
            self.zo_perturb_parameters(scaling_factor=1)
        return loss1

    def _direction(self):
        return np.sign(self.projected_grad) if self.args.trainer == "zo_sign_opt" else self.projected_grad

    def _select(self, model):
        self.named_parameters_to_optim = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def zo_step(self, model, inputs):
        self._select(model)
        for _, param in self.named_parameters_to_optim:
            param.grad = None
        self.zo_random_seed = np.random.randint(1000000000)
        assert self.args.q == 1
        loss1 = self._estimate(model, inputs)
        torch.manual_seed(self.zo_random_seed)
        self.sparse_grad_rng.manual_seed(self.sparse_grad_random_seed)
        for name, param in self.named_parameters_to_optim:
            z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                             dtype=param.data.dtype)
            sparsity = self.get_grad_sparsity_by_name(name)
            if sparsity is not None:
                z[random_mask_like(z, sparsity, self.sparse_grad_rng)] = 0
            param.grad = self._direction() * z / self.args.q
            self.optimizer.step()          # only this parameter has a gradient
            param.grad = None
        assert self.args.gradient_accumulation_steps == 1
        return loss1

    @torch.no_grad()
    def zo_step_v1(self, model, inputs):
        """q directions, each with a new seed; gradients summed; one optimizer step at the end."""
        self._select(model)
        for i in range(self.args.q):
            self.zo_random_seed = np.random.randint(1000000000)
            loss1 = self._estimate(model, inputs)
            torch.manual_seed(self.zo_random_seed)
            for _, param in self.named_parameters_to_optim:
                z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                                 dtype=param.data.dtype)
                contribution = self._direction() * z / self.args.q
                param.grad = contribution if i == 0 else param.grad + contribution
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss1

    @torch.no_grad()
    def zo_conserv_step(self, model, inputs):
        """Estimate, then try theta - lr g z and theta + lr g z and keep the best of the three."""
        self._select(model)
        loss0 = self.zo_forward(model, inputs)
        self.zo_random_seed = np.random.randint(1000000000)
        self._estimate(model, inputs)

        def move(sign):
            torch.manual_seed(self.zo_random_seed)
            for _, param in self.named_parameters_to_optim:
                z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                                 dtype=param.data.dtype)
                param.grad = sign * self.projected_grad * z
                self.optimizer.step()
                param.grad = None

        move(1.0)
        loss1 = self.zo_forward(model, inputs)
        move(-2.0)
        loss2 = self.zo_forward(model, inputs)
        if loss1 > loss0:
            if loss0 < loss2:
                move(1.0)
        elif loss1 < loss2:
            move(2.0)
        return loss1

    @torch.no_grad()
    def zo_step_with_module_wise_perturbation(self, model, inputs):
        """One projected gradient per top-level child module, one shared seed, updates at the end."""
        self.zo_random_seed = np.random.randint(1000000000)
        grads, losses = {}, []
        for module_name, module in model.named_children():
            self.named_parameters_to_optim = [(f"{module_name}.{n}", p)
                                              for n, p in module.named_parameters() if p.requires_grad]
            losses.append(self._estimate(model, inputs))
            grads[module_name] = self.projected_grad
        for module_name, module in model.named_children():
            self.named_parameters_to_optim = [(f"{module_name}.{n}", p)
                                              for n, p in module.named_parameters() if p.requires_grad]
            self.projected_grad = grads[module_name]
            torch.manual_seed(self.zo_random_seed)
            self.sparse_grad_rng.manual_seed(self.sparse_grad_random_seed)
            for name, param in self.named_parameters_to_optim:
                z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device,
                                 dtype=param.data.dtype)
                sparsity = self.get_grad_sparsity_by_name(name)
                if sparsity is not None:
                    z[random_mask_like(z, sparsity, self.sparse_grad_rng)] = 0
                param.grad = self._direction() * z / self.args.q
                self.optimizer.step()
                param.grad = None
        return torch.stack(losses).mean()

    def forward_grad_step(self, model, inputs):
        """Forward gradient: v ~ N(0, I), the directional derivative by jvp, theta -= lr * jvp * v."""
        self._select(model)
        self.zo_random_seed = np.random.randint(1000000000)
        torch.manual_seed(self.zo_random_seed)
        names = [n for n, _ in self.named_parameters_to_optim]
        params = tuple(p.detach() for _, p in self.named_parameters_to_optim)
        vs = tuple(torch.randn_like(p) for p in params)

        def loss_of(*values):
            return torch.func.functional_call(model, dict(zip(names, values)), (), inputs).loss

        loss, slope = torch.func.jvp(loss_of, params, vs)
        with torch.no_grad():
            for v, (_, p) in zip(vs, self.named_parameters_to_optim):
                p.sub_(self._get_learning_rate() * slope * v)
        return loss.detach()

    def forward_grad_update(self, model):
        self.lr_scheduler.step()

    def zo_update(self, model):
        self.lr_scheduler.step()   # the step methods already applied the update


class Output(types.SimpleNamespace):
    pass


class TinyRegressor(torch.nn.Module):
    """fc1 -> layer_norm -> fc2, mean squared error: names that exercise the no-decay rule."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(6, 5)
        self.layer_norm = torch.nn.LayerNorm(5)
        self.fc2 = torch.nn.Linear(5, 2)
        self.layer_norm.weight.requires_grad_(False)     # frozen: never in named_parameters_to_optim

    def forward(self, x, labels):
        return Output(loss=((self.fc2(self.layer_norm(self.fc1(x))) - labels) ** 2).mean())


def regression_batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [dict(x=torch.randn(16, 6, generator=g), labels=torch.randn(16, 2, generator=g))
            for _ in range(n)]


@contextlib.contextmanager
def fastmezo_z():
    """torch.manual_seed(s) + the torch.normal draws after it give fastmezo's z(s, key = draw index)
    from the plain-torch oracle: the original trainer's code then runs along fastmezo's directions."""
    state = {"seed": None, "key": 0}

    def manual_seed(seed):
        state["seed"], state["key"] = int(seed), 0

    def normal(mean=0, std=1, size=None, device=None, dtype=None, **_):
        assert (mean, std) == (0, 1), "the trainers draw standard normals"
        z = R.noise(int(np.prod(size)), state["seed"], state["key"]).view(*size)
        state["key"] += 1
        return z.to(device=device, dtype=dtype)

    with mock.patch.object(torch, "manual_seed", manual_seed), mock.patch.object(torch, "normal", normal):
        yield
