"""Data-parallel training under `torchrun` (several GPUs, or CPU processes with gloo): who am I, which
batches are mine, and who speaks for the group. Without torchrun's environment everything is a no-op."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Group:
    """This process's place in the group torchrun started (RANK, WORLD_SIZE, LOCAL_RANK), else alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    return Group(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device) -> tuple[Group, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); each process takes its own GPU."""
    group = from_env()
    if not group.active:
        return group, device
    if device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        device = torch.device("cuda", group.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return group, device


def my_batches(batches: list, group: Group) -> list:
    """Every rank draws the same batch order (same seed); each takes every world_size-th batch, and all
    take the same number so that no rank waits on a gradient all-reduce the others never start."""
    usable = len(batches) - len(batches) % group.world_size
    return batches[group.rank : usable : group.world_size]


def wrap(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    if not group.active:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def sync_buffers(model: torch.nn.Module, group: Group) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics): DDP broadcasts them before each
    forward, so after an epoch's last step the ranks differ by that step alone."""
    if group.active:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
