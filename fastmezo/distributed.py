"""MeZO on torch.distributed: data parallel with one small all-reduce a step, and FSDP2 shards.

    import torch.distributed as dist, fastmezo
    dist.init_process_group("nccl")                  # under torchrun; "gloo" on CPUs
    handle = fastmezo.patch(model, lr=1e-6, eps=1e-3, seed=0)
    fastmezo.distributed.data_parallel(handle)       # or (optimizer, model=model)
    loss = model.mezo_step(this_ranks_batch)

Every rank regenerates z from the shared seed, so a step needs no parameter traffic: each rank runs
its two forwards on its own micro-batch, one all-reduce of three float64 numbers (l+, l-, how many
ranks failed) gives every rank the mean losses over ranks, and every rank applies the same update.
Replicas stay bit-identical: every rank computes the same passes from the same numbers.

Agreement, so that no rank updates alone:
  * a non-finite loss on any rank makes the summed losses non-finite on every rank: all skip the
    update and restore their weights (the optimizer's ``on_nonfinite`` then applies on every rank);
  * a forward that raises is caught by the closure wrapper; that rank skips its second forward and
    joins the all-reduce with a failure flag; every rank restores its weights, the failing rank
    re-raises its own exception and the others raise :class:`DistributedStepError`. The step counter
    does not move anywhere, so a retry starts in step on all ranks. (Forwards that hold collectives
    themselves, FSDP's all-gathers or DDP's buffer broadcast, cannot be rescued this way when the
    exception comes before those collectives: the other ranks then wait in them until the timeout.)
  * the first step checks that the ranks agree on the base seed, the step counter and the trained
    parameters (names, global shapes, dtypes), with a clear error and no weight moved otherwise;
  * ``check_every=N`` compares a checksum of every replicated tensor across ranks every N steps and
    raises :class:`ReplicaDivergence` naming the first tensor that differs.

A rank that dies leaves the others in the all-reduce until the process group's timeout:
``dist.init_process_group(..., timeout=datetime.timedelta(seconds=...))`` (with NCCL, torch's
default TORCH_NCCL_ASYNC_ERROR_HANDLING turns the timeout into an error); the step then raises on the
survivors, with their weights restored.

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are DTensors; the optimizer's plan holds
each rank's local shard with the global index of its first element as the noise offset
(fastmezo.plan.local_shard), so the sharded run draws the z of the unsharded one, element for element.
FSDP keeps the root module's parameters unsharded after a forward (for a backward MeZO never runs),
where a perturbation of the shards would not reach them: every FSDP module of the model is
resharded before a step and after each forward. With a MixedPrecisionPolicy the shards keep their
dtype (MeZO perturbs and updates them there) and FSDP casts what it gathers. In-place mode only: exact mode's hooks materialize
W + eps z from the parameters the forward reads, which under FSDP are the all-gathered copies.
"""
from __future__ import annotations

import math
import types
import zlib

import torch
import torch.distributed as dist

from .optim import MeZO
from .patch_handle import MeZOPatch
from .plan import _is_dtensor

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_MASK61 = (1 << 61) - 1


class DistributedStepError(RuntimeError):
    """Another rank's forward raised: this rank restored its weights and skipped the step too."""


class ReplicaDivergence(RuntimeError):
    """The replicas' weights (or step counters) differ between ranks."""


def data_parallel(target, group=None, check_every: int | None = None, *, model: torch.nn.Module | None = None):
    """Make every step of ``target`` (a :class:`fastmezo.MeZO` or a :class:`fastmezo.MeZOPatch`) a
    data-parallel step over ``group`` (default: the default process group). ``check_every``: compare
    the replicas' checksums every that many steps. ``model``: the model, when ``target`` is an
    optimizer over an FSDP2 model (its FSDP modules must be resharded before each perturbation).
    Returns the :class:`DataParallel` handle (``remove()`` undoes it)."""
    return DataParallel(target, group, check_every, model=model)


class DataParallel:
    """The handle of :func:`data_parallel`: ``world_size``, ``comm_bytes`` (bytes this rank sent to
    the all-reduces so far), ``remove()``."""

    def __init__(self, target, group=None, check_every=None, *, model=None):
        if isinstance(target, MeZOPatch):
            optimizer, model = target.optimizer, model if model is not None else target.model
        elif isinstance(target, MeZO):
            optimizer = target
        else:
            raise TypeError(f"data_parallel takes a fastmezo.MeZO or the handle of fastmezo.patch, not "
                            f"{type(target).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("data_parallel needs torch.distributed initialized: call "
                               "torch.distributed.init_process_group() first (torchrun sets the environment)")
        if optimizer.reduce_losses is not None:
            raise RuntimeError("this optimizer already combines its losses across processes "
                               "(data_parallel was applied twice?)")
        if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                        or check_every < 1):
            raise ValueError(f"check_every must be None or an int >= 1, got {check_every!r}")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = any(_is_dtensor(p) for p in params)
        self.fsdp_modules = []
        if self.sharded:
            if optimizer.perturbation_mode != "inplace":
                raise ValueError("exact mode does not apply to FSDP2 parameters: the forwards read FSDP's "
                                 "all-gathered copies, not the sharded parameters the hooks would perturb; "
                                 "use mode='inplace'")
            if model is None:
                raise ValueError("the optimizer holds DTensor (FSDP2) parameters: pass model= so that its FSDP "
                                 "modules can be resharded before the weights are perturbed")
            from torch.distributed.fsdp import FSDPModule
            self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.optimizer, self.group, self.check_every = optimizer, group, check_every
        self.world_size = dist.get_world_size(group)
        self.device = _reduce_device(group)
        self.comm_bytes = 0
        self._agreed_at = None         # step counter after the last step whose ranks were checked to agree
        self._failure = None           # this rank's forward exception during the current step
        self._original = {name: getattr(optimizer, name) for name in ("step", "accumulate")}
        optimizer.reduce_losses = self._reduce
        # Bound to the optimizer (not to this handle): an lr scheduler re-binds optimizer.step's
        # __func__ to the optimizer when it wraps it.
        self.active = True
        self._methods = {name: _bind(self, name) for name in self._original}
        for name, method in self._methods.items():
            setattr(optimizer, name, types.MethodType(method, optimizer))

    def remove(self) -> None:
        """Back to single-process steps. Where something wrapped ``optimizer.step`` since (an lr
        scheduler does), the wrapper stays and calls through to the optimizer's own step."""
        opt = self.optimizer
        if not self.active:
            return
        self.active = False
        opt.reduce_losses = None
        for name in self._original:
            if getattr(opt.__dict__.get(name), "__func__", None) is self._methods[name]:
                del opt.__dict__[name]

    # -- one step ---------------------------------------------------------------------------------
    def _run(self, name: str, closure):
        if closure is None and name == "step":
            return self._accumulated_step()
        if closure is None or not callable(closure):
            return self._original[name](closure)         # the optimizer's own error
        self._reshard()
        if self._agreed_at != self.optimizer.step_count:
            self._check_agreement()
        self._failure = None
        try:
            result = self._original[name](self._wrap(closure))
        finally:
            self._failure = None
        self._agreed_at = self.optimizer.step_count
        if name == "step":
            self._maybe_check_replicas()
        return result

    def _accumulated_step(self):
        """``step()`` without a closure (MeZOTrainerOptimizer: apply what ``accumulate`` gathered). Its
        losses were reduced in ``accumulate``, so the ranks move on together and stay in agreement;
        a plain MeZO raises its own error here, changing nothing."""
        agreed = self._agreed_at == self.optimizer.step_count
        self._reshard()
        result = self._original["step"](None)
        if agreed:
            self._agreed_at = self.optimizer.step_count
        self._maybe_check_replicas()
        return result

    def _maybe_check_replicas(self) -> None:
        if self.check_every and self.optimizer.step_count % self.check_every == 0:
            self.check_replicas()

    def _wrap(self, closure):
        def wrapped():
            if self._failure is not None:
                return math.nan          # the step is lost: skip the second forward, go to the all-reduce
            try:
                return closure()
            except BaseException as exc:    # KeyboardInterrupt too: the others must not wait for us
                self._failure = exc
                return math.nan
            finally:
                self._reshard()
        return wrapped

    def _reshard(self) -> None:
        for module in self.fsdp_modules:
            module.reshard()

    def _reduce(self, loss_plus: float, loss_minus: float):
        self.comm_bytes += 8 * 3          # two losses and the failure flag, float64
        return tuple(mean_losses([loss_plus, loss_minus], self._failure, self.group,
                                 where=f"at step {self.optimizer.step_count}"))

    # -- agreement checks -------------------------------------------------------------------------
    def _max_min(self, values: list[int]):
        """Element-wise (max, min) over ranks of non-negative ints below 2**62, one all-reduce."""
        buf = torch.tensor(values + [-v for v in values], dtype=torch.int64, device=self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        self.comm_bytes += buf.numel() * buf.element_size()
        out = buf.tolist()
        return out[:len(values)], [-v for v in out[len(values):]]

    def _check_agreement(self) -> None:
        opt = self.optimizer
        layout = [(name, tuple(p.shape), str(p.dtype)) for g in opt.param_groups
                  for name, p in zip(g.get("param_names") or [None] * len(g["params"]), g["params"])]
        values = [opt.seed & 0xFFFFFFFF, opt.seed >> 32, opt.step_count, zlib.crc32(repr(layout).encode())]
        high, low = self._max_min(values)
        what = ["base seed", "base seed", "step counter", "trained parameters (names, shapes, dtypes)"]
        for i, (h, l) in enumerate(zip(high, low)):
            if h != l:
                shown = "" if i == 3 else f" (this rank: {values[i]}, ranks range over {l}..{h})"
                raise ValueError(f"data parallel: the ranks disagree on the {what[i]}{shown}; every rank must "
                                 "start from the same seed, step and parameters (nothing was changed)")

    def check_replicas(self) -> None:
        """Compare every replicated tensor across ranks (the int64 sum of its bit patterns, one
        all-reduce); :class:`ReplicaDivergence` names the first that differs. Sharded (DTensor)
        parameters are skipped: each rank holds different elements."""
        opt = self.optimizer
        named = [(name, p) for g in opt.param_groups
                 for name, p in zip(g.get("param_names") or [None] * len(g["params"]), g["params"])
                 if not _is_dtensor(p)]
        with torch.no_grad():
            sums = [p.detach().reshape(-1).view(_INT_VIEW[p.dtype]).sum(dtype=torch.int64) for _, p in named]
            values = [opt.step_count] + (torch.stack([s.to(self.device) for s in sums]).bitwise_and(_MASK61).tolist()
                                         if sums else [])
        high, low = self._max_min(values)
        for i, (h, l) in enumerate(zip(high, low)):
            if h != l:
                what = "step counter" if i == 0 else f"tensor {i - 1} ({named[i - 1][0]!r})"
                raise ReplicaDivergence(f"the replicas differ after step {opt.step_count}: {what} is not the "
                                        "same on every rank")


def _reduce_device(group):
    # NCCL reduces CUDA tensors only; a group with gloo (alone or beside NCCL) takes CPU tensors,
    # which costs no device synchronization beyond the .item() the losses already paid.
    backend = str(dist.get_backend(group))
    return torch.device("cpu") if "gloo" in backend or not torch.cuda.is_available() \
        else torch.device("cuda", torch.cuda.current_device())


def mean_losses(losses, failure: BaseException | None, group=None, *, agree=(), where: str = "") -> list[float]:
    """The mean over the ranks of each of ``losses`` (float64 sum / world size), in one all-reduce
    that also carries whether this rank's forward raised (``failure``) and the ints of ``agree``
    (non-negative, < 2**64: a step's seeds), which every rank must hold equal. Every rank reaches the
    same decision from the same sums: a non-finite loss anywhere gives non-finite means everywhere; a
    failure anywhere raises on every rank (the failing rank its own exception, the others
    :class:`DistributedStepError`); unequal ``agree`` values raise ValueError on every rank."""
    world = dist.get_world_size(group)
    # Equality from sums: 16-bit chunks c_r are equal on all ranks iff world * sum(c^2) == sum(c)^2
    # (Cauchy-Schwarz), and both sums are exact in float64.
    chunks = [float((v >> shift) & 0xFFFF) for v in agree for shift in (0, 16, 32, 48)]
    values = [float(x) for x in losses] + [float(failure is not None)] + chunks + [c * c for c in chunks]
    buf = torch.tensor(values, dtype=torch.float64, device=_reduce_device(group))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    sums = buf.tolist()
    n, k = len(losses), len(chunks)
    if sums[n]:
        if failure is not None:
            raise failure
        raise DistributedStepError(f"the forward of {int(sums[n])} of {world} ranks raised {where}; every rank "
                                   "restored its weights and skipped the step (see the failing rank's error)")
    if any(world * q != c * c for c, q in zip(sums[n + 1:n + 1 + k], sums[n + 1 + k:])):
        raise ValueError(f"data parallel: the ranks drew different seeds {where} (this rank: {list(agree)}); "
                         "every rank must draw the same seeds (same RNG seeding, same draws), or the replicas "
                         "would diverge")
    return [total / world for total in sums[:n]]


def _bind(handle: DataParallel, name: str):
    def method(optimizer, closure=None):
        if not handle.active:
            return handle._original[name](closure)
        return handle._run(name, closure)
    method.__name__ = name
    return method
