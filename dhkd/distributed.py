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
from torch import nn
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
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _attempt_store(world, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under a torchrun agent: its store (at MASTER_ADDR:MASTER_PORT) under a prefix per restart attempt.

    After ``--max-restarts`` relaunches the workers, some torch versions hand them the agent's store
    with the keys of the failed attempt still in it, and the new process group reads the dead
    workers' addresses (gloo: "connectFullMesh failed ... Connection refused"). The prefix
    ``/dhkd/attempt_<TORCHELASTIC_RESTART_COUNT>`` keeps every attempt's keys apart. None outside
    torchrun (plain ``env://`` set-up).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"/dhkd/attempt_{attempt}", store)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_process(code: int = 0) -> None:
    """End a finished torchrun worker now: flush stdout/stderr, then ``os._exit(code)``.

    After DDP has run, gloo's threads outlive ``destroy_process_group`` (DDP keeps its process group
    referenced), and the interpreter's C++ teardown then sometimes aborts ("terminate called without
    an active exception", exit status -6), which torchrun reports as a failed worker (and restarts
    under ``--max-restarts``). Everything the run writes is closed before this is called.
    """
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over ranks in place (identity in a single process); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
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


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` into every rank's (in place; no-op in one process)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


def all_reduce_mean_(tensors) -> None:
    """Replace each tensor by its mean over ranks, in place, with one collective per dtype.

    The tensors (e.g. the ``.grad`` of a model's parameters) are flattened into one buffer per dtype,
    summed with ``all_reduce`` and divided by the world size: the gradient DDP's reducer would produce.
    Every rank must pass the same list (same shapes, same order).
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    by_dtype: dict = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


class TrainedParts(nn.Module):
    """The parts of a ``DualHeadStudent`` a method trains, as one module for ``DistributedDataParallel``.

    Registers the backbone and main head, plus the auxiliary head (and its MLP) for methods that use
    it (``distiller.uses_aux_head``): single-head methods never give the aux head a gradient, so it is
    left out of DDP's reducer instead of paying for ``find_unused_parameters``. The teacher is not a
    submodule: it is not broadcast nor synchronized and runs locally on every rank.

    ``forward(images, labels, epoch)`` = ``distiller.forward_train(...)``: DDP must see the forward of
    every step it synchronizes, and the fused loss reads the head weights directly.
    """

    def __init__(self, distiller):
        super().__init__()
        s = distiller.student
        self.backbone, self.head = s.backbone, s.head
        if distiller.uses_aux_head:
            self.aux_head = s.aux_head
            if getattr(s, "aux_mlp", None) is not None:
                self.aux_mlp = s.aux_mlp
        self.__dict__["distiller"] = distiller  # not a submodule: keeps the teacher out of DDP

    def forward(self, images: torch.Tensor, labels: torch.Tensor, epoch: int = 0):
        return self.distiller.forward_train(images, labels, epoch)


def wrap_ddp(distiller, device: torch.device, *, find_unused_parameters: bool = False):
    """``DistributedDataParallel`` over ``TrainedParts(distiller)`` on ``device``.

    Buffers are not broadcast at every forward (``broadcast_buffers=False``): training-mode BatchNorm
    uses batch statistics, and the trainer broadcasts rank 0's buffers before evaluating and saving.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    device_ids = [device.index] if device.type == "cuda" else None
    no_buffer_sync = ({"forward_sync_buffers": False}  # newer torch: broadcast_buffers is deprecated
                      if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                      else {"broadcast_buffers": False})
    return DDP(TrainedParts(distiller), device_ids=device_ids, find_unused_parameters=find_unused_parameters,
               **no_buffer_sync)


def maybe_inject_fault(step: int, rank: int) -> None:
    """Testing hook: ``DHKD_FAULT_AT_STEP=N`` makes rank ``DHKD_FAULT_RANK`` (default 1) exit with
    status 1 just before optimizer step N (1-based), in the first launch of a torchrun job only
    (``TORCHELASTIC_RESTART_COUNT`` "0"), to test restarts. Unset: nothing happens."""
    at = os.environ.get("DHKD_FAULT_AT_STEP")
    if not at or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if step == int(at) and rank == int(os.environ.get("DHKD_FAULT_RANK", "1")):
        print(f"[dhkd] DHKD_FAULT_AT_STEP={at}: rank {rank} exits (fault injection)", flush=True)
        os._exit(1)
