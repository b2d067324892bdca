"""Multi-GPU training through torch.distributed, launched by ``torchrun`` (no home-made scheduler).

``torchrun --nproc_per_node=4 -m tokred run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; tokred then joins the
process group (NCCL on CUDA, gloo on CPU), shards the training set with ``DistributedSampler``, wraps the
model in ``DistributedDataParallel`` and lets only rank 0 write files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_main_process", "world_size", "rank", "barrier", "all_reduce_sum"]


def init_distributed(device: torch.device) -> torch.device:
    """Joins the process group when launched by torchrun; returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sums ``t`` over ranks in place (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
