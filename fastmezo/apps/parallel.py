"""``fastmezo finetune`` data-parallel under torchrun: the MeZO methods on several processes.

    torchrun --nproc-per-node 2 -m fastmezo finetune --methods mezo,mezo-lora,mezo-prefix,mezo-nondiff

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address.
Every rank loads the same pretrained weights; :func:`fastmezo.data_parallel` makes each MeZO step one
all-reduce of the two losses (and a failure flag): each rank runs its two forwards on its own
micro-batch (``--batch-size`` examples, its slice of a global batch of batch-size x ranks,
:func:`fastmezo.apps.training.batches`), and every rank applies the same update from the same seed, so
the replicas stay identical with no weights sent. The replicas are compared at every dev evaluation.

Rank 0 alone evaluates (dev checkpoints, test), prints, and writes the results folder and the
trajectories; the other ranks only train. The methods that do not train with MeZO (zero-shot, icl,
linear probing, Adam) gain nothing from replicas that exchange two losses and are refused here
(``--methods all`` means the MeZO methods): run them without torchrun. CPU ranks use gloo, GPU ranks
NCCL with one GPU each (``LOCAL_RANK``).
"""
from __future__ import annotations

import datetime
import os

import torch

#: How long a rank waits for the others in a collective before failing (a dead rank, say).
TIMEOUT = datetime.timedelta(minutes=10)


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) in a plain process."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (int(os.environ.get("RANK", "0") or 0), size) if size > 1 else (0, 1)


def device_for(device: torch.device) -> torch.device:
    """This rank's device: its own GPU (``LOCAL_RANK``) when ``device`` is CUDA without an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check_methods(methods: list, requested: str, is_mezo) -> list:
    """The methods to run data-parallel: the MeZO ones of ``methods`` for "all"; ValueError naming
    any other that was asked for by name."""
    if str(requested).strip() == "all":
        return [m for m in methods if is_mezo(m)]
    others = [m for m in methods if not is_mezo(m)]
    if others:
        raise ValueError(f"under torchrun only the MeZO methods run (data parallel); {', '.join(others)} "
                         "would only repeat the same work on every rank: run them without torchrun")
    return methods


def start(device: torch.device) -> None:
    """Join the process group (gloo for CPU ranks, NCCL for GPU ranks)."""
    import torch.distributed as dist
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def agree(value):
    """Rank 0's ``value`` on every rank (e.g. the methods a resumed run still has to do)."""
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
