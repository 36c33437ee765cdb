"""fastmezo.distributed on CPU with gloo: 2 and 3 processes (torch.multiprocessing.spawn, a FileStore
rendezvous, so no port is guessed). Each worker writes what it saw with torch.save; the test process
checks it against a single-process run of the same steps (the reference: fastmezo.patch on one model).

Every comparison of weights is bit for bit (torch.equal): data parallel and FSDP2 must not change one
bit against the single-process run, whatever the dtype.
"""
from __future__ import annotations

import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastmezo
from fastmezo.distributed import DistributedStepError, ReplicaDivergence

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

LR, EPS, SEED = 0.05, 1e-2, 1234


def _model(dtype=torch.float32, rows=(7, 3)):
    # Row counts not divisible by 2 or 3: FSDP2's shards are uneven (3 ranks of 7 rows: 3, 3, 1).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, rows[0]), torch.nn.Tanh(), torch.nn.Linear(rows[0], rows[1])).to(dtype)


def _batch(rank: int, step: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 5, generator=g).to(dtype), torch.randn(4, 3, generator=g).to(dtype)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y.float())


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


TIMEOUT = 10       # seconds: the process groups' timeout (how long a survivor waits for a dead rank)


def _spawn(world: int, tmp_path):
    """Every scenario of one world size in one set of processes (starting them is most of the time);
    returns what each rank saw, by scenario."""
    mp.spawn(_entry, args=(world, str(tmp_path)), nprocs=world, join=True)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]


def _entry(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT))
    out = {}
    save = lambda: torch.save(out, f"{tmp}/{rank}.pt")  # noqa: E731
    if world == 2:
        out["dp"] = _dp_worker(rank, world)
        out["fsdp"] = _fsdp_worker(rank, world, torch.float32)
        out["fsdp_mixed"] = _fsdp_worker(rank, world, torch.float32, mixed=True)
        save()
        out["agreement"] = _agreement_worker(rank, world)      # last: rank 1 dies in it
    else:
        out["fsdp"] = _fsdp_worker(rank, world, torch.bfloat16)
        out["dtensor"] = _dtensor_worker(rank, world)
    save()
    dist.destroy_process_group()
    # Leave without the interpreter's and the C++ runtime's teardown: destroy_process_group does not stop
    # gloo's worker and TCP-loop threads (a group lives until its last reference dies), and tearing them
    # down at exit beside a group whose peer died (rank 1's os._exit above) can abort the process
    # ("terminate called without an active exception"). The results are saved; mp.spawn reads exit 0 as
    # success and still reports an exception raised before this line.
    os._exit(0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(2, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _spawn(3, tmp_path_factory.mktemp("three_ranks"))


# -- data parallel ------------------------------------------------------------------------------------
NAN_STEP, RAISE_STEP, STEPS = 2, 4, 6      # rank 1's loss is NaN at NAN_STEP; its forward raises at RAISE_STEP
VARIANTS = ("plain", "ddp", "group", "exact")   # plain model, DDP-wrapped, a given process group, exact mode


def _dp_worker(rank, world):
    out = {}
    for variant in VARIANTS:
        model = _model()
        target = torch.nn.parallel.DistributedDataParallel(model) if variant == "ddp" else model
        handle = fastmezo.patch(target, lr=LR, eps=EPS, seed=SEED, mode="exact" if variant == "exact" else "inplace")
        group = dist.new_group([0, 1]) if variant == "group" else None
        dp = fastmezo.data_parallel(handle, group=group, check_every=1)
        if variant == "group":      # an lr scheduler wraps the patched step (the factor 1 changes nothing)
            scheduler = torch.optim.lr_scheduler.LambdaLR(handle.optimizer, lambda t: 1.0)
        events = []
        for step in range(STEPS):
            batch = _batch(rank, step)

            def closure():
                if rank == 1 and step == RAISE_STEP:
                    raise KeyError("boom")
                loss = _loss(target, batch)
                return loss * math.nan if rank == 1 and step == NAN_STEP else loss
            try:
                with pytest.warns(RuntimeWarning) if step == NAN_STEP else _nothing():
                    handle.step(closure)
                events.append(("ok", handle.optimizer.loss_plus, handle.optimizer.loss_minus))
                if variant == "group":
                    scheduler.step()
            except BaseException as exc:
                events.append((type(exc).__name__, str(exc), _weights(model)))
        out[variant] = dict(events=events, weights=_weights(model), skipped=handle.optimizer.skipped_steps)
        if variant == "group":      # removed: single-process steps, through the scheduler's wrapper too
            dp.remove()
            sent, count = dp.comm_bytes, handle.optimizer.step_count
            handle.step(lambda: _loss(target, _batch(rank, 0)))
            out["removed"] = (dp.comm_bytes - sent, handle.optimizer.step_count - count)
    # A replica that drifts by one ulp is caught at the next check.
    with torch.no_grad():
        if rank == 1:
            w = model[2].weight
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(math.inf))
    try:
        handle.optimizer.step(lambda: _loss(target, _batch(rank, 99)))
        out["divergence"] = None
    except ReplicaDivergence as exc:
        out["divergence"] = str(exc)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _dp_reference(world, mode):
    """The same steps in one process: the loss is the mean over the ranks' batches (float64 sum / world,
    as the all-reduce computes it). The step where a rank raised went through both perturbation passes
    and the restore on every rank (in-place restores are exact only up to rounding), so it is replayed
    as a skipped step whose counter does not move."""
    model = _model()
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED, mode=mode)
    for step in range(STEPS):
        losses = lambda: sum(float(_loss(model, _batch(r, step))) for r in range(world)) / world  # noqa: E731
        if step in (NAN_STEP, RAISE_STEP):
            with pytest.warns(RuntimeWarning):
                handle.step(lambda: math.nan)
            if step == RAISE_STEP:
                handle.optimizer.step_count -= 1
                handle.optimizer.skipped_steps -= 1
        else:
            handle.step(losses)
    return _weights(model)


def test_data_parallel_replicas_match_one_process(two_ranks):
    results = [r["dp"] for r in two_ranks]
    for variant in VARIANTS:
        r0, r1 = results[0][variant], results[1][variant]
        reference = _dp_reference(2, "exact" if variant == "exact" else "inplace")
        start = _weights(_model())
        for name, ref in reference.items():
            assert not torch.equal(ref, start[name]), f"{variant} {name}: the steps did not move it"
            assert torch.equal(r0["weights"][name], ref), f"{variant}: rank 0's {name} differs from one process"
            assert torch.equal(r1["weights"][name], ref), f"{variant}: rank 1's {name} differs from one process"
        # Every rank skipped the NaN step (rank 0's own losses were finite) and saw the same losses.
        assert r0["skipped"] == r1["skipped"] == 1
        ok0, ok1 = ([repr(e) for e in r["events"] if e[0] == "ok"] for r in (r0, r1))
        assert ok0 == ok1 and ok0[NAN_STEP] == "('ok', nan, nan)"
        # The raising rank re-raised its own error, the other a DistributedStepError; both restored.
        kind0, message0, w0 = r0["events"][RAISE_STEP]
        kind1, message1, w1 = r1["events"][RAISE_STEP]
        assert (kind0, kind1) == ("DistributedStepError", "KeyError")
        assert "1 of 2 ranks raised" in message0 and "boom" in message1
        assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert results[0]["removed"] == results[1]["removed"] == (0, 1)
    assert "('2.weight')" in results[0]["divergence"] and results[0]["divergence"] == results[1]["divergence"]


def _agreement_worker(rank, world):
    out = {}
    model = _model()
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED + rank)     # the ranks disagree on the seed
    fastmezo.data_parallel(handle)
    try:
        handle.step(lambda: _loss(model, _batch(rank, 0)))
    except ValueError as exc:
        out["seed_error"] = str(exc)
    out["unchanged"] = all(torch.equal(p, _model().state_dict()[n]) for n, p in model.named_parameters())
    handle.optimizer.seed = SEED
    handle.step(lambda: _loss(model, _batch(rank, 0)))
    if rank == 1:
        os._exit(0)                 # a rank that dies without a word (its results are saved before)
    before = _weights(model)
    start = time.monotonic()
    try:
        handle.step(lambda: _loss(model, _batch(rank, 1)))
        out["dead_rank_error"] = None
    except RuntimeError as exc:
        out["dead_rank_error"] = type(exc).__name__
    out["elapsed"] = time.monotonic() - start
    # Restored as a skipped step restores (in place: +eps, -2 eps, +eps, exact up to rounding).
    replay = _model()
    replay.load_state_dict(before)
    skipped = fastmezo.patch(replay, lr=LR, eps=EPS, seed=SEED)
    skipped.optimizer.step_count = handle.optimizer.step_count
    with pytest.warns(RuntimeWarning):
        skipped.step(lambda: math.nan)
    out["restored"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), replay.parameters()))
    out["moved"] = any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    return out


def test_seed_mismatch_and_dead_rank(two_ranks):
    out = two_ranks[0]["agreement"]
    assert "disagree on the base seed" in out["seed_error"] and out["unchanged"]
    assert out["dead_rank_error"] is not None and out["restored"] and out["moved"]
    assert out["elapsed"] < TIMEOUT + 10, "the survivor waited past the process group's timeout"


# -- FSDP2 --------------------------------------------------------------------------------------------
FSDP_STEPS = 20


def _fsdp_worker(rank, world, dtype, mixed=False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model(dtype)
    # mixed: float32 shards (what MeZO perturbs and updates), forwards in bfloat16 (FSDP casts them).
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
    fully_shard(model[0], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED)
    fastmezo.data_parallel(handle)
    losses = []
    for step in range(FSDP_STEPS):
        handle.step(lambda: _loss(model, _batch(rank, step, dtype)))
        losses.append((handle.optimizer.loss_plus, handle.optimizer.loss_minus))
    return dict(losses=losses, weights={n: p.full_tensor() for n, p in model.named_parameters()},
                local_rows={n: p.to_local().shape[0] for n, p in model.named_parameters()})


@pytest.mark.parametrize("world,dtype,mixed", [(2, torch.float32, False), (2, torch.float32, True),
                                               (3, torch.bfloat16, False)])
def test_fsdp2_matches_unsharded(request, world, dtype, mixed):
    key = "fsdp_mixed" if mixed else "fsdp"
    results = [r[key] for r in request.getfixturevalue("two_ranks" if world == 2 else "three_ranks")]
    assert len({tuple(r["local_rows"].values()) for r in results}) > 1, "the shards should be uneven"
    # One process, the same starting weights, the same (all-reduced) losses: the same steps.
    model = _model(dtype)
    start = _weights(model)
    handle = fastmezo.patch(model, lr=LR, eps=EPS, seed=SEED)
    computed = []
    for step, (plus, minus) in enumerate(results[0]["losses"]):
        replay = iter((plus, minus))

        def closure():
            # The losses this process computes at the same weights (did the FSDP forwards see the
            # perturbed shards?); the recorded ones drive the step.
            with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
                computed.append(sum(float(_loss(model, _batch(r, step, dtype))) for r in range(world)) / world)
            return next(replay)
        handle.step(closure)
    for r in results:
        assert r["losses"] == results[0]["losses"]
    recorded = [loss for pair in results[0]["losses"] for loss in pair]
    assert computed == recorded and len(set(recorded)) > FSDP_STEPS
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name])
        for rank, r in enumerate(results):
            assert torch.equal(r["weights"][name], p), f"rank {rank}: gathered {name} differs from one process"


def _dtensor_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    rows, replicated = distribute_tensor(full, mesh, [Shard(0)]), distribute_tensor(full, mesh, [Replicate()])
    fastmezo.functional.perturb_([rows, replicated], 99, 0.5)
    out = dict(rows=rows.full_tensor(), replicated=replicated.full_tensor())
    columns = distribute_tensor(full, mesh, [Shard(1)])
    for call in (lambda: fastmezo.functional.perturb_([columns], 99, 0.5),
                 lambda: fastmezo.functional.perturb_([rows], 99, 0.5, offsets=[0])):
        try:
            call()
        except ValueError as exc:
            out.setdefault("errors", []).append(str(exc))
    return out


def test_manually_sharded_dtensors(three_ranks):
    out = three_ranks[0]["dtensor"]
    full = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    expected = [full.clone(), full.clone()]
    fastmezo.functional.perturb_(expected, 99, 0.5)
    assert torch.equal(out["rows"], expected[0]) and torch.equal(out["replicated"], expected[1])
    assert not torch.equal(expected[0], full)
    assert "not one contiguous range" in out["errors"][0] and "offsets cannot be given" in out["errors"][1]
