"""Data-parallel training on PyTorch's own engine (DistributedDataParallel under torchrun).

``torchrun --nproc_per_node N -m leukoscope train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK and
the rendezvous; this module turns them into a process group (gloo on CPU, NCCL on GPU), wraps
the model, shards each global batch across ranks and lets only rank 0 write files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_preference: str = "auto") -> tuple[World, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns the world and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_preference in ("auto", "cuda")
    if size <= 1:
        device = torch.device("cuda" if cuda else "cpu") if device_preference == "auto" else torch.device(device_preference)
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(world.local_rank)
        return world, torch.device("cuda", world.local_rank)
    return world, torch.device("cpu")


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    if not world.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch (every rank sees the same global order)."""
    return indices[world.rank :: world.size]


def all_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sync_buffers(model: nn.Module, world: World) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each forward, but the last training step leaves each rank with
    its own statistics; syncing after every epoch keeps validation and checkpoints identical.
    """
    if world.distributed:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def broadcast_flag(value: bool, world: World) -> bool:
    """Rank 0's ``value`` on every rank: decisions such as early stopping are taken once."""
    if not world.distributed:
        return value
    tensor = torch.tensor([int(value)])
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def weights_digest(model: nn.Module) -> str:
    """sha256 over all parameters and buffers, to check that ranks hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
