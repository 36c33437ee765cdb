"""Trajectories and replay: the trained weights rebuilt bit for bit from the base weights and the
recorded steps (fastmezo.trajectory, fastmezo.replayer), and clear errors for other base weights.

Training and replay run on the same backend (CPU: the native library, else the oracle), so the
comparison is exact equality in every dtype: no tolerance."""
import copy
import json
import math
import warnings

import pytest
import torch

import fastmezo
from fastmezo import __main__ as cli
from fastmezo.replayer import step_passes
from fastmezo.trajectory import Trajectory

from conftest import TRITON_DEVICE


def _model(dtype, device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.LayerNorm(12),
                               torch.nn.Linear(12, 1)).to(dtype).to(device)


def _data(dtype, device="cpu"):
    g = torch.Generator().manual_seed(1)
    return torch.randn(24, 6, generator=g).to(dtype).to(device), torch.randn(24, 1, generator=g).to(dtype).to(device)


def _train(mode, dtype, steps, snapshot_at=None, device="cpu", **options):
    """A patched model trained ``steps`` steps with a decaying lr, weight decay on the Linear weights
    and three non-finite losses (skipped steps); returns (base copy, model, handle, snapshot)."""
    model = _model(dtype, device)
    base = copy.deepcopy(model)
    x, y = _data(dtype, device)
    handle = fastmezo.patch(model, lr=3e-3, eps=1e-2, weight_decay=0.05, mode=mode, trajectory=True, **options)
    sched = torch.optim.lr_scheduler.StepLR(handle.optimizer, step_size=50, gamma=0.5)
    snapshot = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # the skipped steps' warnings
        for t in range(steps):
            bad = t in (7, 61, 130)
            handle.step(lambda: float("nan") if bad else ((model(x) - y) ** 2).float().mean())
            sched.step()
            if t + 1 == snapshot_at:
                snapshot = copy.deepcopy(model)
    return base, model, handle, snapshot


def _equal(m1, m2):
    return all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("mode", ["inplace", "exact"])
@pytest.mark.parametrize("dtype, rounding", [(torch.float32, "update"), (torch.bfloat16, "update"),
                                             (torch.bfloat16, True)])
def test_replay_of_200_steps_is_bit_identical(mode, dtype, rounding):
    """fp32 and bf16 (stochastic rounding of the update, the default, or of every pass), in place and
    exact: replay gives the trained weights bit for bit, and ``steps=`` the weights after that many steps."""
    base, model, handle, snapshot = _train(mode, dtype, 200, snapshot_at=120, stochastic_rounding=rounding)
    traj = handle.optimizer.trajectory
    assert len(traj.records) == 200 and handle.optimizer.skipped_steps == 3
    assert [r["skipped"] is not None for r in traj.records].count(True) == 3
    assert traj.records[0]["lr"] != traj.records[-1]["lr"]          # the schedule is recorded
    assert not _equal(base, model)                                   # training moved the weights
    partial = copy.deepcopy(base)
    assert fastmezo.replay(partial, traj, steps=120) == 120
    assert _equal(partial, snapshot)
    assert fastmezo.replay(base, traj) == 200
    assert _equal(base, model)


def test_inplace_replay_needs_the_perturb_passes():
    """In place, the +eps / -2 eps passes round too: replaying only the updates does not give the
    trained weights (which is why replay re-runs every pass; exact mode has only the updates)."""
    base, model, handle, _ = _train("inplace", torch.float32, 20)
    traj = handle.optimizer.trajectory
    updates_only = Trajectory(dict(traj.header, strategy="exact"), traj.records)
    fastmezo.replay(base, updates_only)
    assert not _equal(base, model)
    assert max((a - b).abs().max().item() for a, b in zip(base.parameters(), model.parameters())) < 1e-5


def test_the_file_is_small_and_reads_back_exactly(tmp_path):
    """trajectory=path writes the header and one JSON line per step as the run goes; the file reads
    back to the same records (floats bit for bit) and replays to the trained weights."""
    path = tmp_path / "run.jsonl"
    model = _model(torch.float32)
    base = copy.deepcopy(model)
    x, y = _data(torch.float32)
    opt = fastmezo.MeZO(fastmezo.param_groups(model, 0.01), lr=1e-2, eps=1e-3, trajectory=str(path))
    for _ in range(50):
        opt.step(lambda: ((model(x) - y) ** 2).mean())
    lines = path.read_text().splitlines()
    assert len(lines) == 51 and json.loads(lines[0])["base"]["sha256"] == opt.trajectory.header["base"]["sha256"]
    assert path.stat().st_size < 50 * 400 + 2000                      # a few hundred bytes a step
    loaded = Trajectory.load(path)
    assert loaded.records == opt.trajectory.records
    fastmezo.replay(base, path)
    assert _equal(base, model)


def _accumulated_run(dtype):
    model = _model(dtype)
    base = copy.deepcopy(model)
    x, y = _data(dtype)
    opt = fastmezo.MeZO(fastmezo.param_groups(model), lr=1e-2, eps=1e-2, trajectory=True)
    for t in range(12):
        for j in range(1 + t % 3):                                    # 1, 2, 3 micro-batches
            rows = slice(8 * j, 8 * j + 8)
            opt.accumulate(lambda: ((model(x[rows]) - y[rows]) ** 2).float().mean())
        opt.step_accumulated()
    return base, model, opt


def test_accumulated_steps_replay_with_their_micro_batch_passes():
    """An accumulated step of k micro-batches made 3k perturb/restore passes and updated with pass 3k;
    replay re-runs them all (bf16, stochastic rounding: every pass's bits matter)."""
    base, model, opt = _accumulated_run(torch.bfloat16)
    assert [r["update_pass"] for r in opt.trajectory.records[:3]] == [3, 6, 9]
    assert len(step_passes("inplace", opt.trajectory.records[2])) == 10
    assert not _equal(base, model)
    fastmezo.replay(base, opt.trajectory)
    assert _equal(base, model)


def test_an_accumulated_step_without_its_count_is_refused_before_any_pass():
    base, _, opt = _accumulated_run(torch.float32)
    opt.trajectory.records[1]["update_pass"] = None         # a file from elsewhere, without the count
    before = copy.deepcopy(base)
    with pytest.raises(ValueError, match="micro-batch count was not recorded"):
        fastmezo.replay(base, opt.trajectory)
    assert _equal(base, before)


@pytest.fixture
def recorded():
    base, model, handle, _ = _train("exact", torch.float32, 5)
    return base, handle.optimizer.trajectory


@pytest.mark.parametrize("change, message", [
    ("value", "sha256 differs"),
    ("name", "no parameter '0.weight'"),
    ("shape", r"float32 \[12, 7\], the trajectory was recorded on float32 \[12, 6\]"),
    ("dtype", r"is float64 \[12, 6\]"),
    ("version", "noise contract v0"),
])
def test_other_base_weights_are_refused_before_anything_changes(recorded, change, message):
    base, traj = recorded
    params = dict(base.named_parameters())
    if change == "value":
        with torch.no_grad():
            params["3.bias"].add_(1e-6)
    elif change == "name":
        params["first.weight"] = params.pop("0.weight")
    elif change == "shape":
        params["0.weight"] = torch.nn.Parameter(torch.randn(12, 7))
    elif change == "dtype":
        params["0.weight"] = torch.nn.Parameter(params["0.weight"].double())
    else:
        traj = Trajectory(dict(traj.header, noise_version=0), traj.records)
    before = {k: v.detach().clone() for k, v in params.items()}
    with pytest.raises(ValueError, match=message):
        fastmezo.replay(params, traj)
    assert all(torch.equal(before[k], v) for k, v in params.items())


def test_a_model_changed_after_the_trajectory_started_is_refused_at_the_first_step():
    model = _model(torch.float32)
    x, y = _data(torch.float32)
    opt = fastmezo.MeZO(model.named_parameters(), lr=1e-3, trajectory=True)
    model.bfloat16()
    with pytest.raises(RuntimeError, match="the model changed after the trajectory started"):
        opt.step(lambda: ((model(x.bfloat16()) - y.bfloat16()) ** 2).float().mean())


def test_command_line_writes_the_trained_weights(tmp_path):
    """python -m fastmezo replay BASE TRAJECTORY OUT with a safetensors file as BASE."""
    from safetensors.torch import load_file, save_file

    base, model, handle, _ = _train("inplace", torch.bfloat16, 30)
    save_file({k: v.detach().contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    handle.optimizer.trajectory.save(tmp_path / "run.jsonl")
    assert cli.main(["replay", str(tmp_path / "base.safetensors"), str(tmp_path / "run.jsonl"),
                     str(tmp_path / "out")]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(model.state_dict())
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    assert not math.isclose(out["0.weight"].float().sum().item(), base.state_dict()["0.weight"].float().sum().item())


# -- MeZOTrainer(save_trajectory_only=True) ---------------------------------------------------------

def _tiny_opt():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=16))


def _trainer(tmp_path, name, resume=None, **options):
    """A MeZOTrainer on a tiny OPT built from a config (the same base weights every time): 6 steps of 2
    micro-batches, a checkpoint every 3 steps; returns the trained model."""
    transformers = pytest.importorskip("transformers")
    from fastmezo.integrations.transformers import MeZOTrainer, mezo_optimizer_cls_and_kwargs

    with torch.random.fork_rng():
        model = _tiny_opt()
        ids = torch.randint(4, 64, (24, 8), generator=torch.Generator().manual_seed(3))
        data = [dict(input_ids=r, attention_mask=torch.ones_like(r), labels=r.clone()) for r in ids]
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=6, learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="linear", seed=5,
            save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, disable_tqdm=True,
            dataloader_num_workers=0, logging_steps=3)
        trainer = MeZOTrainer(model=model, args=args, train_dataset=data,
                              optimizer_cls_and_kwargs=mezo_optimizer_cls_and_kwargs(model, args, eps=1e-2),
                              **options)
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trainer_resume_from_a_trajectory_checkpoint_gives_the_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path, "full")
    traj = _trainer(tmp_path, "traj", save_trajectory_only=True)
    ckpt = tmp_path / "traj" / "checkpoint-3"
    assert not list(ckpt.glob("*.safetensors")) and (ckpt / "mezo_trajectory.jsonl").is_file()
    assert len(Trajectory.load(ckpt / "mezo_trajectory.jsonl").records) == 3
    assert _equal(traj.model, full.model)                 # recording changes nothing of the run
    with torch.random.fork_rng():
        assert not _equal(full.model, _tiny_opt())         # and the run moved the weights
    from_traj = _trainer(tmp_path, "from_traj", resume=str(ckpt), save_trajectory_only=True)
    assert _equal(from_traj.model, full.model)            # = the uninterrupted run, as a resume from weights
    final = Trajectory.load(tmp_path / "from_traj" / "checkpoint-6" / "mezo_trajectory.jsonl")
    assert final.records == Trajectory.load(tmp_path / "traj" / "checkpoint-6" / "mezo_trajectory.jsonl").records
    assert [r["update_pass"] for r in final.records] == [6] * 6
    # The command line, with a Hugging Face model folder as BASE: OUT loads as the trained model.
    transformers = pytest.importorskip("transformers")
    with torch.random.fork_rng():
        _tiny_opt().save_pretrained(tmp_path / "base")
    assert cli.main(["replay", str(tmp_path / "base"), str(ckpt.parent / "checkpoint-6" / "mezo_trajectory.jsonl"),
                     str(tmp_path / "replayed")]) == 0
    assert _equal(transformers.OPTForCausalLM.from_pretrained(tmp_path / "replayed"), full.model)


# -- the fused replay kernel (kernels/replay.py): compiled on a GPU, else through Triton's interpreter --

@pytest.mark.parametrize("noise, dtype, stochastic", [(0, torch.float32, False), (0, torch.bfloat16, True),
                                                      (1, torch.float16, True), (0, torch.float16, False),
                                                      (1, torch.bfloat16, False), (0, torch.float16, "mixed"),
                                                      (1, torch.bfloat16, "mixed")])
def test_fused_kernel_equals_the_passes_one_by_one(noise, dtype, stochastic):
    """K steps of 1-4 passes each in one launch == the same passes by kernels.axpbz one at a time:
    tensors at unaligned offsets, partial blocks, keys above 2**31; "mixed": each pass rounds
    stochastically or to nearest at random, as MeZO's default rounds its update only. Blocks of 1024
    elements (the bits do not depend on the block size) keep the interpreter quick."""
    import random

    from fastmezo.kernels.axpbz import axpbz_multi_
    from fastmezo.kernels.replay import fused_replay_
    from fastmezo.noise import rounding_seed

    rng = random.Random(noise * 10 + len(str(dtype)))
    gen = torch.Generator().manual_seed(2)
    tensors = [(torch.randn(n, generator=gen) * 0.02).to(dtype).to(TRITON_DEVICE) for n in (1000, 37, 4099)]
    keys, offsets = [11, 2**32 - 3, 7], [0, 5, 130]
    steps = []
    for _ in range(5):
        seed = rng.getrandbits(64)
        rounds = [stochastic is True or (stochastic == "mixed" and rng.random() < 0.5) for _ in range(4)]
        steps.append((seed, [(rng.uniform(0.99, 1.0), rng.uniform(-1e-2, 1e-2),
                              rounding_seed(seed, p) if rounds[p] else None) for p in range(rng.randint(1, 4))]))
    one_by_one = [t.clone() for t in tensors]
    for seed, passes in steps:
        for a, b, rs in passes:
            axpbz_multi_(one_by_one, a, b, seed, keys, noise, offsets, round_seed=rs, block=1024)
    fused = [t.clone() for t in tensors]
    fused_replay_(fused, keys, noise, steps, offsets, block=1024)
    assert all(torch.equal(f, o) for f, o in zip(fused, one_by_one))
    assert all(not torch.equal(f, t) for f, t in zip(fused, tensors))


@pytest.mark.parametrize("mode, dtype, rounding", [("inplace", torch.bfloat16, "update"),
                                                   ("inplace", torch.bfloat16, True), ("exact", torch.float32, "update")])
def test_fused_replay_of_a_triton_run_is_bit_identical(mode, dtype, rounding):
    """A run trained on the Triton backend (a skipped step included), replayed 4 steps per launch
    (chunks that do not divide the run): the trained weights, in place (perturb passes fused in;
    rounding to nearest and stochastic rounding mixed in one launch with the default) and in exact mode."""
    base, model, handle, _ = _train(mode, dtype, 9, device=TRITON_DEVICE, backend="triton",
                                    stochastic_rounding=rounding)
    records = handle.optimizer.trajectory.records
    assert {r["rounding"] for r in records} == {"stochastic" if rounding is True else "update"}
    assert handle.optimizer.skipped_steps == 1
    fastmezo.replay(base, handle.optimizer.trajectory, fused=4)
    assert _equal(base, model)


def test_a_step_counted_but_not_recorded_makes_in_place_replay_warn():
    """on_nonfinite="raise" in accumulate() counts the step without an update or a record: its in-place
    passes rounded the weights, so replay says it cannot be bit-identical; exact mode is unaffected."""
    model = _model(torch.float32)
    x, y = _data(torch.float32)
    opt = fastmezo.MeZO(fastmezo.param_groups(model), lr=1e-2, eps=1e-2, trajectory=True, on_nonfinite="raise")
    with pytest.raises(FloatingPointError):
        opt.accumulate(lambda: float("inf"))
    opt.step(lambda: ((model(x) - y) ** 2).mean())
    assert [r["step"] for r in opt.trajectory.records] == [1]
    with pytest.warns(RuntimeWarning, match="steps 0..0 are not recorded"):
        fastmezo.replay(_model(torch.float32), opt.trajectory)
