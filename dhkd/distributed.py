"""Process-group set-up for torchrun and the few collective helpers the trainer needs.

One code path serves a single process and DDP: outside torchrun ``init_distributed`` returns a
world of size 1 and every helper here is the identity. Under torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` set) it joins the process group with NCCL when CUDA is available, else gloo.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_distributed(device_type: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); a world of 1 outside torchrun.

    ``device_type`` ("cuda"/"cpu") forces the backend choice; by default CUDA availability decides.
    On CUDA each rank binds ``cuda:LOCAL_RANK``.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place (identity in a single process); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class ShardSampler(Sampler[int]):
    """Deterministic, unpadded evaluation shards: rank r takes indices r, r + W, r + 2W, ...

    Unlike ``DistributedSampler`` it never repeats a sample to even out the shards, so summing the
    per-rank counts visits every sample exactly once (the last shards may be one shorter).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank={rank}, world_size={world_size}")
        self.length, self.rank, self.world_size = int(length), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
