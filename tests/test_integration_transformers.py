"""MeZO in the Hugging Face Trainer (fastmezo.integrations.transformers) against a hand-written MeZO,
and MeZO.accumulate / step_accumulated (gradient accumulation) against a plain-torch oracle.

The oracle takes z from fastmezo.oracle.noise (the plain-torch noise oracle), perturbs and updates
the weights with plain torch ops, and computes the causal-LM loss from the logits itself; it shares no
code with the integration. Models are tiny OPTs built from a config (random weights, dropout on, so
that a forward in train mode would not match the oracle's eval-mode forwards).
"""
import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as TF

transformers = pytest.importorskip("transformers")
from transformers import OPTConfig, OPTForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

import fastmezo  # noqa: E402
from fastmezo import derive_seed, oracle  # noqa: E402
from fastmezo.integrations.transformers import (MeZOTrainer, MeZOTrainerOptimizer,  # noqa: E402
                                                mezo_optimizer_cls_and_kwargs)

pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------------
# helpers (test_peft.py uses them too)
# ----------------------------------------------------------------------------------------------

VOCAB, SEQ = 64, 8
OPT_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                  max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1)


def _tiny_opt(seed: int = 0) -> OPTForCausalLM:
    """A 2-layer OPT with hidden size 32 (lm_head tied to the token embedding), random weights.
    Built under a forked RNG: the tests leave torch's global RNG as they found it."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return OPTForCausalLM(OPTConfig(**OPT_CONFIG))


def _dataset(n: int, seed: int):
    """n random token sequences (labels = inputs: causal LM), from a private generator."""
    ids = torch.randint(4, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row.clone()) for row in ids]


def _args(tmp_path, **overrides) -> TrainingArguments:
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=2,
                   learning_rate=0.05, weight_decay=0.1, lr_scheduler_type="linear", seed=7, logging_steps=1,
                   save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                   dataloader_num_workers=0)
    options.update(overrides)
    return TrainingArguments(**options)


class _Recording(MeZOTrainer):
    """MeZOTrainer that records the micro-batches the Trainer hands to training_step, so that the
    oracle replays exactly those (whatever the sampler's order)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def _train(trainer):
    """trainer.train() with torch's global RNG restored afterwards (the Trainer seeds it)."""
    with torch.random.fork_rng():
        return trainer.train()


def _lm_loss_sum(model, batch) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropy, from the logits (no labels given)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    return TF.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _window_loss(model, batch, window):
    """The loss of one micro-batch as the Trainer normalises it for a model that takes
    num_items_in_batch: summed over its tokens, divided by the target tokens of the whole window."""
    n_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in window)
    return float(_lm_loss_sum(model, batch)) / n_items


def _no_decay(name: str) -> bool:
    return "bias" in name or "layer_norm" in name


def _oracle(model, windows, *, lrs, eps, wd, seed, key_of, loss_fn=_window_loss):
    """Hand-written MeZO with gradient accumulation, in plain torch, on ``model`` (changed in place).

    Step t: z = z(derive_seed(seed, t), key_of(name)) per trainable tensor (each tensor once, tied
    ones too: named_parameters() lists a shared tensor once); for every micro-batch of the window:
    theta + eps z -> l+, theta - eps z -> l-, back to theta; g = sum (l+ - l-) / (2 eps); then
    theta <- (1 - lr_t wd) theta - lr_t g z, no decay on bias and layer norms. Forwards in eval mode.
    Returns the weights after each step, the projected gradients and the (l+ + l-)/2 sums."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.eval()
    trajectory, grads, losses = [], [], []
    with torch.no_grad():
        for t, (window, lr) in enumerate(zip(windows, lrs)):
            zs = [oracle.noise(p.numel(), derive_seed(seed, t), key_of(n)).view_as(p) for n, p in params]
            g, mean_loss = 0.0, 0.0
            for batch in window:
                for (_, p), z in zip(params, zs):
                    p.add_(eps * z)
                lp = loss_fn(model, batch, window)
                for (_, p), z in zip(params, zs):
                    p.sub_(2 * eps * z)
                lm = loss_fn(model, batch, window)
                for (_, p), z in zip(params, zs):
                    p.add_(eps * z)
                g += (lp - lm) / (2 * eps)
                mean_loss += (lp + lm) / 2
            for (n, p), z in zip(params, zs):
                p.mul_(1 - lr * (0.0 if _no_decay(n) else wd)).sub_(lr * g * z)
            trajectory.append({n: p.detach().clone() for n, p in params})
            grads.append(g)
            losses.append(mean_loss)
    return trajectory, grads, losses


def _crc_key(name: str) -> int:
    """The noise key of a parameter of an unwrapped model: CRC-32 of its name (docs/noise.md)."""
    return zlib.crc32(name.encode()) & 0xFFFFFFFF


def weight_tol(lrs, eps) -> dict:
    """Tolerance of weights after steps with learning rates ``lrs`` against the oracle, in float32.

    The limit is the projected gradient: losses (< 5 here) are float32, ulp <= 4.8e-7, so
    g = (l+ - l-) / (2 eps) is known to about 2 ulp / (2 eps), and the weights to
    sum_t lr_t * that * |z| (|z| < 5). The rest is small: z from a fast backend is within 1e-5 |z| of
    the oracle's (docs/noise.md), and the passes round like plain torch ops up to fused multiply-adds
    (~1e-8 here). With lr 0.05, 0.025 and eps 1e-2: 1.8e-5 (observed up to 5e-6), while the updates
    lr * g * z are 1e-3 .. 1e-1."""
    return dict(rtol=0, atol=sum(lrs) * (4.8e-7 / eps) * 5 + 1e-6)


def _assert_weights(actual: dict, expected: dict, tol: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol, msg=name)


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# the Trainer against the hand-written MeZO
# ----------------------------------------------------------------------------------------------

EPS = 1e-2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_matches_hand_written_mezo(tmp_path, accumulation):
    model = _tiny_opt()
    initial = _trainable(model)
    args = _args(tmp_path, gradient_accumulation_steps=accumulation)
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(8, seed=1),
                         optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    trainer.seen = []
    _train(trainer)

    # One window of `accumulation` micro-batches per optimizer step; linear decay from 0.05 to 0
    # over 2 steps: the scheduler must have set lr 0.05, then 0.025.
    windows = [trainer.seen[i:i + accumulation] for i in range(0, len(trainer.seen), accumulation)]
    assert len(windows) == 2 and all(len(w) == accumulation for w in windows)
    lrs = [0.05, 0.025]
    trajectory, grads, losses = _oracle(_tiny_opt(), windows, lrs=lrs, eps=EPS, wd=0.1, seed=7, key_of=_crc_key)
    _assert_weights(_trainable(model), trajectory[-1], weight_tol(lrs, EPS))
    moved = max((initial[n] - p).abs().max().item() for n, p in _trainable(model).items())
    assert moved > 1e-3

    # The tied lm_head / embedding is one tensor, perturbed and updated once (the oracle does it once).
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    optimizer = trainer._mezo_optimizer()
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == sum(p.numel() for p in initial.values())

    # Logs: the projected gradient of each step, the scheduler's lr, the loss the Trainer reports.
    # g agrees to the loss rounding / (2 eps) (see weight_tol); the losses to float32 rounding.
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2]
    assert [entry["projected_grad"] for entry in train_logs] == pytest.approx(grads, rel=1e-3, abs=1e-4)
    assert [entry["projected_grad_abs_mean"] for entry in train_logs] == pytest.approx([abs(g) for g in grads], rel=1e-3, abs=1e-4)
    assert [entry["learning_rate"] for entry in train_logs] == pytest.approx(lrs)
    assert [entry["loss"] for entry in train_logs] == pytest.approx(losses, rel=1e-5)
    assert all("grad_norm" not in entry for entry in train_logs)
    assert optimizer.step_count == 2 and optimizer.last_seed == derive_seed(7, 1)

    # No backward ran: no parameter has a gradient.
    assert all(p.grad is None for p in model.parameters())


class _MeanLossLM(torch.nn.Module):
    """A tiny OPT behind a forward without **kwargs: the Trainer then passes no num_items_in_batch,
    the model returns the mean token loss of its micro-batch, and the Trainer divides that by the
    accumulation steps (the other branch of the Trainer's loss scaling)."""

    def __init__(self):
        super().__init__()
        self.lm = _tiny_opt()

    def forward(self, input_ids, attention_mask, labels):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_trainer_mean_loss_model_averages_micro_batches(tmp_path):
    model = _MeanLossLM()
    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(8, seed=1),
                         optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    assert not trainer.model_accepts_loss_kwargs
    trainer.seen = []
    _train(trainer)

    def mean_loss_over_window(model, batch, window):
        # Mean over this micro-batch's target tokens, averaged over the window's micro-batches.
        return float(_lm_loss_sum(model.lm, batch)) / batch["labels"][:, 1:].numel() / len(window)

    windows = [trainer.seen[0:2], trainer.seen[2:4]]
    lrs = [0.05, 0.025]
    trajectory, grads, losses = _oracle(_MeanLossLM(), windows, lrs=lrs, eps=EPS, wd=0.1, seed=7,
                                        key_of=_crc_key, loss_fn=mean_loss_over_window)
    _assert_weights(_trainable(model), trajectory[-1], weight_tol(lrs, EPS))
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["projected_grad"] for entry in train_logs] == pytest.approx(grads, rel=1e-3, abs=1e-4)
    assert [entry["loss"] for entry in train_logs] == pytest.approx(losses, rel=1e-5)


def test_trainer_single_batch_steps_match_mezo_step(tmp_path):
    """With gradient_accumulation_steps=1, the Trainer's steps are fastmezo.MeZO.step's steps (on the
    same batches, lr and seed) up to the float32 rounding of the separate restore pass (which can
    move the next losses by an ulp: weight_tol)."""
    model = _tiny_opt()
    args = _args(tmp_path, weight_decay=0.0)
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(4, seed=2),
                         optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    trainer.seen = []
    _train(trainer)

    twin = _tiny_opt()
    twin.eval()
    opt = fastmezo.MeZO(fastmezo.param_groups(twin), lr=0.05, eps=EPS, seed=7, keys="name")
    for batch, lr in zip(trainer.seen, [0.05, 0.025]):
        for group in opt.param_groups:
            group["lr"] = lr
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        opt.step(lambda batch=batch, n_items=n_items: twin(**batch, num_items_in_batch=n_items).loss)
    _assert_weights(_trainable(model), _trainable(twin), weight_tol([0.05, 0.025], EPS))


def test_evaluation_and_checkpoints_see_unperturbed_weights(tmp_path):
    """Evaluation (eval_loss, and the weights an evaluation callback sees) and every checkpoint hold
    the weights after the optimizer step, never perturbed ones: they equal the oracle's trajectory."""
    from safetensors.torch import load_file

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.at_evaluate = []

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            self.at_evaluate.append((state.global_step, _trainable(model)))

    model = _tiny_opt()
    eval_set = _dataset(4, seed=3)
    args = _args(tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=1,
                 per_device_eval_batch_size=4, save_strategy="steps", save_steps=1)
    snapshot = Snapshot()
    trainer = _Recording(model=model, args=args, train_dataset=_dataset(8, seed=1), eval_dataset=eval_set,
                         callbacks=[snapshot],
                         optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    trainer.seen = []
    _train(trainer)
    trainer.save_model(str(tmp_path / "final"))

    windows = [trainer.seen[0:2], trainer.seen[2:4]]
    oracle_model = _tiny_opt()
    trajectory, _, _ = _oracle(oracle_model, windows, lrs=[0.05, 0.025], eps=EPS, wd=0.1, seed=7, key_of=_crc_key)
    TOL = weight_tol([0.05, 0.025], EPS)

    assert [step for step, _ in snapshot.at_evaluate] == [1, 2]
    eval_batch = {k: torch.stack([row[k] for row in eval_set]) for k in eval_set[0]}
    eval_losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    for (step, weights), expected, eval_loss in zip(snapshot.at_evaluate, trajectory, eval_losses):
        _assert_weights(weights, expected, TOL)
        # The eval loss is the oracle model's mean token loss at those weights (float32 rounding).
        oracle_model.load_state_dict(expected, strict=False)
        n_items = eval_batch["labels"][:, 1:].numel()
        with torch.no_grad():
            assert eval_loss == pytest.approx(float(_lm_loss_sum(oracle_model, eval_batch)) / n_items, rel=1e-5)

    for step, expected in zip([1, 2], trajectory):
        checkpoint = tmp_path / "out" / f"checkpoint-{step}"
        saved = load_file(str(checkpoint / "model.safetensors"))
        _assert_weights({n: saved[n] for n in expected}, expected, TOL)
        # The optimizer state resumes the noise sequence at the right step.
        mezo_state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["mezo"]
        assert mezo_state["step_count"] == step and mezo_state["seed"] == 7
    final = load_file(str(tmp_path / "final" / "model.safetensors"))
    _assert_weights({n: final[n] for n in trajectory[-1]}, trajectory[-1], TOL)

    # Resuming from checkpoint-1 (weights, optimizer state with the step count, RNG and data
    # position) gives step 2 as the uninterrupted run had it: same batches, same z.
    resumed = _tiny_opt(seed=5)  # other initial weights: the checkpoint must replace them
    args = _args(tmp_path, gradient_accumulation_steps=2, save_strategy="no")
    trainer = _Recording(model=resumed, args=args, train_dataset=_dataset(8, seed=1),
                         optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(resumed, args, eps=EPS))
    trainer.seen = []
    with torch.random.fork_rng():
        trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert len(trainer.seen) == 2
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(trainer.seen, windows[1]))
    assert trainer._mezo_optimizer().last_seed == derive_seed(7, 1)
    _assert_weights(_trainable(resumed), trajectory[-1], TOL)


def test_exception_in_forward_restores_weights(tmp_path):
    """A forward that raises inside training_step (here the theta - eps z one) propagates, and the
    weights are back at theta: within 3 float32 ulp (three roundings), though they were moved by eps z."""
    class Boom(Exception):
        pass

    class Failing(MeZOTrainer):
        calls = 0

        def compute_loss(self, model, inputs, **kwargs):
            Failing.calls += 1
            if Failing.calls == 2:
                self.at_failure = _trainable(model)
                raise Boom
            return super().compute_loss(model, inputs, **kwargs)

    model = _tiny_opt()
    before = _trainable(model)
    args = _args(tmp_path)
    trainer = Failing(model=model, args=args, train_dataset=_dataset(4, seed=1),
                      optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    with pytest.raises(Boom):
        _train(trainer)
    seed = derive_seed(7, 0)
    for name, w0 in before.items():
        z = oracle.noise(w0.numel(), seed, _crc_key(name)).view_as(w0)
        # At the failing forward the weights were at theta - eps z (the perturbation really happened) ...
        torch.testing.assert_close(trainer.at_failure[name], w0 - EPS * z, rtol=1e-5, atol=1e-6)
        # ... and now they are restored.
        after = dict(model.named_parameters())[name].detach()
        tol = 3 * torch.finfo(torch.float32).eps * (w0.abs() + 2 * EPS * z.abs())
        assert torch.all((after - w0).abs() <= tol), name
    assert trainer._mezo_optimizer().step_count == 0


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def test_model_without_trainable_parameters_is_rejected(tmp_path):
    model = _tiny_opt()
    model.requires_grad_(False)
    before = {n: p.clone() for n, p in model.named_parameters()}
    args = _args(tmp_path)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mezo_optimizer_cls_and_kwargs(model, args)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MeZOTrainer(model=model, args=args, train_dataset=_dataset(2, seed=1),
                    optimizer_cls_and_kwargs=(MeZOTrainerOptimizer, dict(lr=0.1)))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_wrong_or_missing_optimizer_is_rejected(tmp_path):
    model = _tiny_opt()
    args = _args(tmp_path)
    data = _dataset(2, seed=1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs"):
        MeZOTrainer(model=model, args=args, train_dataset=data)
    with pytest.raises(TypeError, match="MeZOTrainerOptimizer"):
        MeZOTrainer(model=model, args=args, train_dataset=data, optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    with pytest.raises(TypeError, match="without a closure.*MeZOTrainerOptimizer"):
        MeZOTrainer(model=model, args=args, train_dataset=data,
                    optimizers=(fastmezo.MeZO(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="lr="):
        mezo_optimizer_cls_and_kwargs(model)
    with pytest.raises(ValueError, match="eps must be"):
        mezo_optimizer_cls_and_kwargs(model, args, eps=0.0)


def test_optimizers_tuple_and_step_without_estimates(tmp_path):
    """optimizers=(MeZOTrainerOptimizer(...), None) trains too (keys by index here); step() with nothing
    accumulated is a clear error that changes nothing."""
    model = _tiny_opt()
    before = _trainable(model)
    opt = MeZOTrainerOptimizer(model.parameters(), lr=0.05, eps=EPS, seed=3)
    with pytest.raises(ValueError, match="no micro-batch estimates"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in _trainable(model).items())
    trainer = MeZOTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_dataset(2, seed=1),
                          optimizers=(opt, None))
    _train(trainer)
    assert opt.step_count == 1 and math.isfinite(opt.projected_grad) and opt.projected_grad != 0
    assert max((before[n] - p).abs().max().item() for n, p in _trainable(model).items()) > 1e-4


# ----------------------------------------------------------------------------------------------
# MeZO.accumulate / step_accumulated (the optimizer side of gradient accumulation)
# ----------------------------------------------------------------------------------------------

def _mlp_params():
    g = torch.Generator().manual_seed(11)
    return [torch.randn(6, 4, generator=g) * 0.5, torch.randn(6, generator=g) * 0.1,
            torch.randn(3, 6, generator=g) * 0.5]


def _mlp_batches(k):
    g = torch.Generator().manual_seed(12)
    return [(torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)) for _ in range(k)]


def _mlp_loss(params, batch):
    w1, b1, w2 = params
    x, y = batch
    return ((torch.tanh(x @ w1.T + b1) @ w2.T - y) ** 2).mean()


def test_accumulate_matches_oracle_over_micro_batches():
    """k = 3 micro-batches, losses scaled by 1/k: one update along one z with the mean estimate."""
    params, batches, k, eps, lr, wd, seed = _mlp_params(), _mlp_batches(3), 3, 1e-2, 0.1, 0.05, 5
    ref = [p.clone() for p in params]
    opt = fastmezo.MeZO(params, lr=lr, eps=eps, weight_decay=wd, seed=seed)
    results = [opt.accumulate(lambda b=b: _mlp_loss(params, b) / k) for b in batches]
    assert opt.pending_micro_batches == 3 and opt.step_count == 0

    zs = [oracle.noise(p.numel(), derive_seed(seed, 0), i).view_as(p) for i, p in enumerate(ref)]
    g = 0.0
    for b, (lp_got, lm_got) in zip(batches, results):
        lp = float(_mlp_loss([p + eps * z for p, z in zip(ref, zs)], b)) / k
        lm = float(_mlp_loss([p - eps * z for p, z in zip(ref, zs)], b)) / k
        assert (lp_got, lm_got) == pytest.approx((lp, lm), rel=1e-5)
        g += (lp - lm) / (2 * eps)
    ret = opt.step_accumulated()
    assert opt.projected_grad == pytest.approx(g, rel=1e-3, abs=1e-4)
    assert ret == opt.loss_plus == pytest.approx(sum(r[0] for r in results), rel=1e-12)
    assert opt.last_seed == derive_seed(seed, 0) and opt.step_count == 1 and opt.pending_micro_batches == 0
    for p, r, z in zip(params, ref, zs):
        torch.testing.assert_close(p, (1 - lr * wd) * r - lr * g * z, rtol=1e-5, atol=1e-6)
    assert max((p - r).abs().max().item() for p, r in zip(params, ref)) > 1e-3
    # The next step uses the next direction.
    opt.accumulate(lambda: _mlp_loss(params, batches[0]))
    opt.step_accumulated()
    assert opt.last_seed == derive_seed(seed, 1)


def test_accumulate_one_micro_batch_equals_step():
    params, twin, batch = _mlp_params(), _mlp_params(), _mlp_batches(1)[0]
    a = fastmezo.MeZO(params, lr=0.1, eps=1e-2, weight_decay=0.05, seed=9)
    b = fastmezo.MeZO(twin, lr=0.1, eps=1e-2, weight_decay=0.05, seed=9)
    a.accumulate(lambda: _mlp_loss(params, batch))
    a.step_accumulated()
    b.step(lambda: _mlp_loss(twin, batch))
    # Same passes up to the update, so the same losses bit for bit; the weights differ only by the
    # rounding of the separate restore pass.
    assert (a.loss_plus, a.loss_minus, a.projected_grad) == (b.loss_plus, b.loss_minus, b.projected_grad)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accumulate_restores_on_error_and_rejects_bad_use():
    params = _mlp_params()
    before = [p.clone() for p in params]
    opt = fastmezo.MeZO(params, lr=0.1, eps=1e-2, seed=1)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("forward failed")
        return _mlp_loss(params, _mlp_batches(1)[0])

    with pytest.raises(KeyError):
        opt.accumulate(failing)
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
    assert opt.pending_micro_batches == 0
    with pytest.raises(ValueError, match="no micro-batch estimates"):
        opt.step_accumulated()
    with pytest.raises(ValueError, match="needs a closure"):
        opt.accumulate(None)
    # Estimates of a step that the optimizer has left (here: a resumed state) are not applied.
    opt.accumulate(lambda: _mlp_loss(params, _mlp_batches(1)[0]))
    state = fastmezo.MeZO(_mlp_params(), seed=1).state_dict()
    state["mezo"]["step_count"] = 4
    opt.load_state_dict(state)
    with pytest.raises(RuntimeError, match="moved on"):
        opt.step_accumulated()
    assert opt.pending_micro_batches == 0


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_accumulate_non_finite_loss(mode):
    params = _mlp_params()
    before = [p.clone() for p in params]
    opt = fastmezo.MeZO(params, lr=0.1, eps=1e-2, seed=1, on_nonfinite=mode)
    opt.accumulate(lambda: _mlp_loss(params, _mlp_batches(1)[0]))
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.accumulate(lambda: float("nan"))
        assert opt.pending_micro_batches == 0
    else:
        opt.accumulate(lambda: float("inf"))
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step_accumulated()
        assert math.isnan(opt.projected_grad)
    assert opt.step_count == 1 and opt.skipped_steps == 1
    for p, b in zip(params, before):  # restored, no update
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.accumulate(lambda: _mlp_loss(params, _mlp_batches(1)[0]))
        opt.step_accumulated()
    assert opt.last_seed == derive_seed(1, 1)
