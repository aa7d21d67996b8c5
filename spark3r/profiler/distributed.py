"""Sharding clips across `torchrun` ranks; results meet through the per-clip files and a barrier.

Launched with `torchrun --nproc-per-node K profile-layers ...`, each rank profiles clips rank, rank + K, ... on
cuda:LOCAL_RANK (nccl) or the CPU (gloo), writes one file per clip, and rank 0 merges them after a barrier.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

from spark3r.errors import Spark3rError

T = TypeVar("T")
BARRIER_TIMEOUT = datetime.timedelta(hours=6)  # ranks wait for the slowest one's clips


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the launch: rank of world_size; local_rank picks its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_ranks() -> Ranks:
    """The ranks torchrun set in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without them."""
    try:
        return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise Spark3rError("RANK, WORLD_SIZE or LOCAL_RANK is not an integer: launch with torchrun "
                           "or unset them") from None


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """cuda -> cuda:LOCAL_RANK when several ranks share a host; other devices unchanged."""
    if device.type == "cuda" and ranks.distributed:
        if ranks.local_rank >= torch.cuda.device_count():
            raise Spark3rError(f"rank {ranks.rank} wants cuda:{ranks.local_rank} but only "
                               f"{torch.cuda.device_count()} GPU(s) are visible: lower --nproc-per-node")
        return torch.device("cuda", ranks.local_rank)
    return device


def init_distributed(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo otherwise) when launched with more than one rank."""
    if not ranks.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's share of `items`: every world_size-th one, starting at its rank."""
    return list(items[ranks.rank::ranks.world_size])


def barrier(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.barrier()


def close_distributed(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
