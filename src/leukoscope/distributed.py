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

from .errors import LeukoscopeError


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
    from .runtime import resolve_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_preference)
    cuda = device.type == "cuda"
    if size <= 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if cuda and world.local_rank >= torch.cuda.device_count():
        raise LeukoscopeError(f"torchrun started local rank {world.local_rank}, but PyTorch sees {torch.cuda.device_count()} GPU(s) on "
                              f"this node and training takes one per process: give --nproc_per_node {torch.cuda.device_count()} or "
                              "less (or --device cpu)")
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():  # NCCL told its GPU up front: no guess from the global rank
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=torch.device("cuda", world.local_rank) if cuda else None)
    if cuda:
        return world, torch.device("cuda", world.local_rank)
    return world, torch.device("cpu")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, summed across ranks.

    PyTorch's ``nn.SyncBatchNorm`` runs on GPUs only; this one all-reduces per-channel sums (a
    differentiable all-reduce, so gradients flow through the global statistics too) and runs on
    gloo as on NCCL. With one process, or in eval mode, it is a plain BatchNorm2d; its state_dict
    is a BatchNorm2d's, so checkpoints load into the plain model.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels, xf = x.shape[1], x.float()
        count = torch.full((1,), x.numel() / channels, dtype=torch.float32, device=x.device)
        total = _AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (xf * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]).to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a SyncBatchNorm2d holding the same parameters and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced.to(child.weight.device))
        else:
            convert_sync_batchnorm(child)
    return module


SYNC_BN_BELOW = 32  # per-rank batch size under which BatchNorm statistics are synchronised by default


def wrap(model: nn.Module, world: World, device: torch.device, sync_bn: bool | None = None, batch_size: int = 64) -> nn.Module:
    """DistributedDataParallel under torchrun; BatchNorm synchronised across ranks when ``sync_bn``
    (None: when each rank's share of a batch is under ``SYNC_BN_BELOW`` images, where per-rank
    statistics get noisy)."""
    if not world.distributed:
        return model
    if sync_bn or (sync_bn is None and batch_size / world.size < SYNC_BN_BELOW):
        model = convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of a global batch (every rank sees the same global order)."""
    return indices[world.rank :: world.size]


def _carrier() -> torch.device:
    """Where a tensor sent between ranks must live: NCCL moves only GPU tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_carrier())
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
    tensor = torch.tensor([int(value)], device=_carrier())
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def close(world: World) -> None:
    """Leave the process group together: a rank that tore its group down while rank 0 still scored
    the run (evaluation and the alarm's fit happen on rank 0 alone) was once seen to abort."""
    if world.distributed and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer already gone (it failed): nothing to wait for
            pass
        dist.destroy_process_group()


def weights_digest(model: nn.Module) -> str:
    """sha256 over all parameters and buffers, to check that ranks hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
