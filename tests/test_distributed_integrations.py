"""The integrations under data parallelism, on CPU with gloo and 2 processes: MeZOTrainer under a
torchrun-style launch (DDP, and FSDP2 applied by the caller) and use_fastmezo with a data-parallel
trainer. One set of processes (torch.multiprocessing.spawn with torchrun's RANK / LOCAL_RANK /
WORLD_SIZE, a FileStore rendezvous) runs every scenario; each rank saves what it saw and the test
process checks it against single-process runs.

Every rank sees its own batches. What must hold, bit for bit (torch.equal; the losses are averaged in
float64 on every rank, then each rank applies the same float32 passes):
  * both ranks end with the same weights, and a one-process optimizer driven by the averaged losses
    reaches them too (FSDP2: the gathered weights);
  * the averaged losses are the float64 mean of the two ranks' own losses, which differ;
  * checkpoints are written by rank 0 alone and hold the weights of their step; a run resumed from
    one ends where the uninterrupted run ended (weights, and trajectory-only checkpoints).
"""
from __future__ import annotations

import datetime
import math
import os
from unittest import mock

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
import zo_trainers as Z  # noqa: E402
from transformers import OPTConfig, OPTForCausalLM, TrainingArguments  # noqa: E402

import fastmezo.trajectory  # noqa: E402
from fastmezo.integrations import use_fastmezo  # noqa: E402
from fastmezo.integrations.transformers import MeZOTrainer, mezo_optimizer_cls_and_kwargs  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

WORLD, STEPS, ACCUMULATION, LR, EPS, WD, SEED = 2, 3, 2, 0.05, 1e-2, 0.1, 7


def _tiny_opt(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                        num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=32))


def _dataset():
    ids = torch.randint(4, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    return [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row.clone()) for row in ids]


def _weights(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_entry, args=(str(tmp),), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{rank}.pt", weights_only=False) for rank in range(WORLD)], tmp


def _entry(rank, tmp):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    out = dict(ddp=_run(tmp, "ddp"), ddp_resumed=_run(tmp, "ddp_resumed", resume="ddp/checkpoint-2"),
               trajectory=_run(tmp, "trajectory", trajectory=True),
               trajectory_resumed=_run(tmp, "trajectory_resumed", trajectory=True, resume="trajectory/checkpoint-2"),
               fsdp=_run(tmp, "fsdp", sharded=True),
               fsdp_resumed=_run(tmp, "fsdp_resumed", sharded=True, resume="fsdp/checkpoint-2"),
               adapter=_adapter_worker(rank))
    torch.save(out, f"{tmp}/{rank}.pt")
    dist.destroy_process_group()


# -- MeZOTrainer --------------------------------------------------------------------------------------
class _Recorded(MeZOTrainer):
    """Records the averaged (l+, l-) of every micro-batch (what accumulate returns) and this rank's own
    losses, as the closure hands them to the all-reduce."""
    mezo_check_every = 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        optimizer = self._mezo_optimizer()
        if "accumulate" not in vars(optimizer):     # before data_parallel wraps it: it calls this one
            accumulate = optimizer.accumulate
            optimizer.accumulate = lambda closure: self.averaged.append(accumulate(closure)) or self.averaged[-1]
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, num_items_in_batch=None, **kwargs):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch, **kwargs)
        self.own.append(float(loss.detach().float() * self._mezo_loss_scale(num_items_in_batch)))
        return loss


def _run(tmp, name, sharded=False, trajectory=False, resume=None):
    # Resumed from weights: other initial weights, which the checkpoint must replace; from a
    # trajectory: the base weights, which it replays.
    model = _tiny_opt(5 if resume and not trajectory else 0)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    args = TrainingArguments(output_dir=f"{tmp}/{name}", per_device_train_batch_size=2,
                             gradient_accumulation_steps=ACCUMULATION, max_steps=STEPS, learning_rate=LR,
                             weight_decay=WD, lr_scheduler_type="constant", seed=SEED, logging_steps=1,
                             save_strategy="no" if resume else "steps", save_steps=1, report_to="none",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = _Recorded(model=model, args=args, train_dataset=_dataset(), save_trajectory_only=trajectory,
                        optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=EPS))
    trainer.averaged, trainer.own, writes = [], [], []
    save_file = transformers.modeling_utils.safe_save_file
    save_trajectory = fastmezo.trajectory.Trajectory.save
    with mock.patch.object(transformers.modeling_utils, "safe_save_file",
                           lambda *a, **k: writes.append("weights") or save_file(*a, **k)), \
            mock.patch.object(fastmezo.trajectory.Trajectory, "save",
                              lambda self, path: writes.append("trajectory") or save_trajectory(self, path)):
        trainer.train(resume_from_checkpoint=f"{tmp}/{resume}" if resume else None)
    return dict(averaged=trainer.averaged, own=trainer.own, weights=_weights(model), writes=writes,
                wrapped=type(trainer.model_wrapped).__name__, comm_bytes=trainer.mezo_data_parallel.comm_bytes)


def _one_process(averaged):
    """The run in one process, driven by the averaged losses: the weights after every step."""
    model = _tiny_opt(0)
    cls, kwargs = mezo_optimizer_cls_and_kwargs(model, lr=LR, eps=EPS, weight_decay=WD, seed=SEED)
    optimizer, after = cls(**kwargs), []
    for step in range(STEPS):
        for plus, minus in averaged[step * ACCUMULATION:(step + 1) * ACCUMULATION]:
            losses = iter((plus, minus))
            optimizer.accumulate(lambda: next(losses))
        optimizer.step()
        after.append(_weights(model))
    return after


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_mezo_trainer_data_parallel_matches_one_process(ranks, run):
    from safetensors.torch import load_file
    results, tmp = ranks
    r0, r1 = (r[run] for r in results)
    # The Trainer wraps a plain model in DDP; a model the caller sharded stays as fully_shard made it.
    assert r0["wrapped"] == r1["wrapped"] == ("DistributedDataParallel" if run == "ddp" else "FSDPOPTForCausalLM")
    # The same averaged losses on both ranks: the float64 mean of each rank's own, which differ.
    assert r0["averaged"] == r1["averaged"] and len(r0["averaged"]) == STEPS * ACCUMULATION
    own = list(zip(r0["own"][0::2], r0["own"][1::2], r1["own"][0::2], r1["own"][1::2]))
    assert r0["averaged"] == [((a + c) / 2, (b + d) / 2) for a, b, c, d in own]
    assert all(a != c for a, _, c, _ in own), "the ranks should see different batches"
    after = _one_process(r0["averaged"])
    start = _weights(_tiny_opt(0))
    for name, expected in after[-1].items():
        assert not torch.equal(expected, start[name])
        assert torch.equal(r0["weights"][name], expected) and torch.equal(r1["weights"][name], expected), name
    # One checkpoint per step, written by rank 0 alone, with the weights of its step.
    assert (r0["writes"], r1["writes"]) == (["weights"] * STEPS, [])
    for step in range(1, STEPS + 1):
        saved = load_file(str(tmp / run / f"checkpoint-{step}" / "model.safetensors"))
        # lm_head is tied to the token embedding (FSDP2's gathered state dict lists it under both names).
        expected = {**after[step - 1], "lm_head.weight": after[step - 1]["model.decoder.embed_tokens.weight"]}
        assert saved.keys() <= expected.keys() and "model.decoder.layers.0.fc1.weight" in saved
        assert all(torch.equal(saved[n], expected[n]) for n in saved), f"checkpoint-{step}"
        mezo = torch.load(tmp / run / f"checkpoint-{step}" / "optimizer.pt", weights_only=False)["mezo"]
        assert mezo["step_count"] == step
    # Resumed from checkpoint-2 (other initial weights): the uninterrupted run's last step.
    for r in results:
        resumed = r[f"{run}_resumed"]
        assert resumed["averaged"] == r0["averaged"][-ACCUMULATION:]
        assert all(torch.equal(resumed["weights"][n], after[-1][n]) for n in after[-1])
    # Per micro-batch, one all-reduce of 3 float64 (two losses, the failure flag), and the checks.
    assert r0["comm_bytes"] >= STEPS * ACCUMULATION * 24


def test_trajectory_only_checkpoints_under_data_parallel(ranks):
    results, tmp = ranks
    r0, r1 = (r["trajectory"] for r in results)
    assert (r0["writes"], r1["writes"]) == (["trajectory"] * STEPS, [])
    assert sorted(os.listdir(tmp / "trajectory" / "checkpoint-2")).count("model.safetensors") == 0
    # Trajectory-only checkpoints do not change training: the weights of the run that saved weights.
    ddp = results[0]["ddp"]["weights"]
    for r in results:
        for run in ("trajectory", "trajectory_resumed"):
            assert all(torch.equal(r[run]["weights"][n], ddp[n]) for n in ddp), (run, "differs from the ddp run")
    saved = fastmezo.trajectory.Trajectory.load(tmp / "trajectory" / "checkpoint-2" / "mezo_trajectory.jsonl")
    assert [record["step"] for record in saved.records] == [0, 1]


# -- use_fastmezo with a data-parallel trainer ---------------------------------------------------------
ADAPTER_MODES = {
    "paper, DDP-wrapped, wd 0.1, linear lr": (Z.PaperTrainer, dict(weight_decay=0.1, lr_scheduler_type="linear")),
    "zo_sgd q=2": (Z.ZOBenchTrainer, dict(q=2)),
    "zo_sgd q=1 one_side": (Z.ZOBenchTrainer, dict(perturbation_mode="one_side")),
}
NAN_STEP, RAISE_STEP, ADAPTER_STEPS = 1, 3, 5


def _adapter_trainer(kind, options, model=None):
    make_args = Z.paper_args if kind is Z.PaperTrainer else Z.zo_bench_args
    return kind(model or Z.TinyRegressor(), make_args(**{"zo_eps": 1e-2, "learning_rate": 0.03, **options}))


def _faulty(trainer, rank_losses):
    """zo_forward: NaN at NAN_STEP; at RAISE_STEP the second forward raises (on rank 1 only in the
    data-parallel run: ``rank_losses`` is None there; in the one-process run it averages both ranks)."""
    forward, calls = trainer.zo_forward, []

    def zo_forward(model, inputs):
        calls.append(None)
        step, second = divmod(len(calls) - 1, 2)
        if step == RAISE_STEP and second and (rank_losses or dist.get_rank() == 1):
            raise KeyError("boom")
        loss = rank_losses(model, inputs) if rank_losses else forward(model, inputs)
        return loss * math.nan if step == NAN_STEP and (rank_losses or dist.get_rank() == 1) else loss
    trainer.zo_forward = zo_forward


def _run_steps(trainer, batches):
    """The paper's loop, one step at a time, recording each step's error."""
    trainer.create_optimizer_and_scheduler(len(batches))
    events = []
    for inputs in batches:
        try:
            trainer.zo_step(trainer.model, inputs)
            trainer.zo_update(trainer.model)
            events.append("ok")
        except (KeyError, ValueError, RuntimeError) as exc:
            events.append(f"{type(exc).__name__}: {exc}")
        trainer.history.append((int(trainer.zo_random_seed), getattr(trainer, "projected_grad", None)))
    return events


def _adapter_worker(rank):
    out = {}
    batches = Z.regression_batches(ADAPTER_STEPS, seed=100 + rank)
    for name, (kind, options) in ADAPTER_MODES.items():
        np.random.seed(11)
        trainer = _adapter_trainer(kind, options)
        if kind is Z.PaperTrainer:
            trainer.model = torch.nn.parallel.DistributedDataParallel(trainer.model)
        use_fastmezo(trainer)
        trainer.train(batches)
        module = getattr(trainer.model, "module", trainer.model)
        out[name] = dict(weights=_weights(module), history=trainer.history)
    np.random.seed(11)
    trainer = _adapter_trainer(Z.PaperTrainer, {})
    use_fastmezo(trainer)
    _faulty(trainer, None)
    out["faults"] = dict(events=_run_steps(trainer, batches), weights=_weights(trainer.model), history=trainer.history)
    np.random.seed(11 + rank)                               # the ranks' numpy generators disagree
    trainer = _adapter_trainer(Z.PaperTrainer, {})
    use_fastmezo(trainer)
    out["seed_mismatch"] = dict(events=_run_steps(trainer, batches[:1]), weights=_weights(trainer.model))
    errors = []
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    sharded = fully_shard(Z.TinyRegressor(), mesh=init_device_mesh("cpu", (WORLD,)))
    for model, data_parallel in ((sharded, None), (None, "yes")):
        try:
            use_fastmezo(_adapter_trainer(Z.PaperTrainer, {}, model), data_parallel=data_parallel)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    out["errors"] = errors
    return out


def _one_process_adapter(kind, options, faults=False):
    """The same trainer in one process; its forward returns the float64 mean of both ranks' losses."""
    np.random.seed(11)
    trainer = _adapter_trainer(kind, options)
    use_fastmezo(trainer)
    forward = trainer.zo_forward
    pairs = list(zip(*(Z.regression_batches(ADAPTER_STEPS, seed=100 + rank) for rank in range(WORLD))))
    mean = lambda model, pair: torch.tensor(  # noqa: E731
        sum(float(forward(model, inputs)) for inputs in pair) / WORLD, dtype=torch.float64)
    if faults:
        _faulty(trainer, mean)
        return trainer, _run_steps(trainer, pairs)
    trainer.zo_forward = mean
    trainer.train(pairs)
    return trainer, None


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_frontend_adapter_with_a_data_parallel_trainer(ranks):
    results, _ = ranks
    r0, r1 = (r["adapter"] for r in results)
    for name, (kind, options) in ADAPTER_MODES.items():
        trainer, _ = _one_process_adapter(kind, options)
        assert r0[name]["history"] == r1[name]["history"] == trainer.history, name
        for n, p in trainer.model.named_parameters():
            assert torch.equal(r0[name]["weights"][n], p) and torch.equal(r1[name]["weights"][n], p), (name, n)
            assert not torch.equal(p, _weights(Z.TinyRegressor())[n]) or not p.requires_grad
    # A NaN on rank 1 is one on every rank; a forward raising on rank 1 makes both undo the step.
    trainer, events = _one_process_adapter(Z.PaperTrainer, {}, faults=True)
    e0, e1 = r0["faults"]["events"], r1["faults"]["events"]
    assert e0[NAN_STEP] == e1[NAN_STEP] == events[NAN_STEP] and "projected_grad" in e0[NAN_STEP]
    assert e0[RAISE_STEP].startswith("DistributedStepError") and "1 of 2 ranks raised" in e0[RAISE_STEP]
    assert e1[RAISE_STEP] == events[RAISE_STEP] == "KeyError: 'boom'"
    assert [e for i, e in enumerate(e0) if i not in (NAN_STEP, RAISE_STEP)] == ["ok"] * (ADAPTER_STEPS - 2)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(r0["faults"]["weights"][n], p) and torch.equal(r1["faults"]["weights"][n], p), n
    # Ranks that drew different seeds are stopped before any update, weights restored.
    start = _weights(Z.TinyRegressor())
    for r in (r0, r1):
        assert "drew different seeds" in r["seed_mismatch"]["events"][0]
        for n, p in r["seed_mismatch"]["weights"].items():
            torch.testing.assert_close(p, start[n], rtol=0, atol=1e-6)
    assert "FSDP2 (DTensor) parameters" in r0["errors"][0] and "data_parallel must be" in r0["errors"][1]
