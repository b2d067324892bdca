"""Multi-GPU training through torch.distributed, launched by ``torchrun`` (no home-made scheduler).

``torchrun --nproc_per_node=4 -m tokred run ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; tokred then joins the
process group (NCCL on CUDA, gloo on CPU), shards the training set with ``DistributedSampler``, wraps the
model in ``DistributedDataParallel`` and lets only rank 0 write files.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["env_rank", "init_distributed", "is_main_process", "local_device", "rank", "world_size"]


def env_rank() -> int:
    """This process's rank as torchrun set it (``RANK``), readable before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def local_device(device: torch.device) -> torch.device:
    """The device this process uses: under torchrun, ``cuda:LOCAL_RANK`` (made current) for a CUDA device;
    unchanged otherwise. Needs no process group, so stages before it (the policy stage) use the right GPU."""
    if device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> torch.device:
    """Joins the process group when launched by torchrun (NCCL on CUDA, gloo on CPU); returns this rank's
    device (:func:`local_device`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    device = local_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def world_size() -> int:
    """Processes in the group (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0, the only process that writes files."""
    return rank() == 0
