"""Distributed helpers on CPU with gloo: unpadded evaluation shards and exact all-reduced counts."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dhkd.distributed import DistInfo, ShardSampler, all_reduce_sum, destroy_distributed, init_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("length,world", [(10, 3), (7, 2), (1, 4), (0, 2), (12, 4)])
def test_shards_cover_every_index_once(length, world):
    seen = sorted(i for r in range(world) for i in ShardSampler(length, r, world))
    assert seen == list(range(length))
    assert sum(len(ShardSampler(length, r, world)) for r in range(world)) == length


def test_shard_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(5, rank=2, world_size=2)


def test_single_process_is_identity(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert info == DistInfo() and info.is_main and not info.enabled
    t = torch.tensor([3.0])
    assert all_reduce_sum(t).item() == 3.0


def _worker(rank, world, port, preds, labels, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed(device_type="cpu")
    assert info.backend == "gloo" and info.world_size == world
    idx = list(ShardSampler(len(labels), info.rank, info.world_size))
    counts = torch.tensor([float((preds[idx] == labels[idx]).sum()), float(len(idx))], dtype=torch.float64)
    all_reduce_sum(counts)
    out[rank] = counts.tolist()
    destroy_distributed()


def test_distributed_counts_equal_single_process():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (23,), generator=g)
    preds = torch.randint(0, 5, (23,), generator=g)
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), preds, labels, out), nprocs=world, join=True)
        results = dict(out)
    expected = [float((preds == labels).sum()), 23.0]
    assert results == {0: expected, 1: expected}
