"""torchrun helpers: the trainer reads RANK, WORLD_SIZE and LOCAL_RANK."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["gather_objects", "init", "is_main", "rank", "world_size"]


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> tuple[bool, int]:
    """Start the process group when launched by torchrun (nccl on GPUs, gloo on CPU).

    Returns:
        ``(distributed, local_rank)``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return True, local_rank


def gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
