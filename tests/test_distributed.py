"""Distributed helpers on CPU with gloo: unpadded evaluation shards, exact all-reduced counts, the
collectives and wrapper the DDP trainer uses, restart-store isolation, fault hook, --resume auto."""
import datetime
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dhkd.config import load_config
from dhkd.distributed import (DistInfo, ShardSampler, all_reduce_sum, destroy_distributed, init_distributed,
                              leave_process)
from tests.trainer_helpers import CONFIGS, FAST, dhkd_cache  # noqa: F401


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
    leave_process()  # see its docstring: gloo's C++ teardown can abort a finished worker


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


# ---------------------------------------------------------------- helpers of the DDP trainer

def _collectives_worker(rank, world, port, out):
    from dhkd.distributed import all_reduce_mean_, broadcast_tensors
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(device_type="cpu")
    a = torch.full((2, 3), float(rank + 1))
    b = torch.arange(4, dtype=torch.float64) * (rank + 1)
    c = torch.tensor([rank * 10.0])
    all_reduce_mean_([a, b, c])
    buf = torch.full((3,), float(rank + 5))
    broadcast_tensors([buf])
    out[rank] = (a.tolist(), b.tolist(), c.tolist(), buf.tolist(), b.dtype == torch.float64)
    destroy_distributed()
    leave_process()  # see its docstring: gloo's C++ teardown can abort a finished worker


def test_all_reduce_mean_and_broadcast():
    """Mean over ranks of a mixed-dtype list, in place; rank 0's values broadcast to all."""
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_collectives_worker, args=(world, free_port(), out), nprocs=world, join=True)
        results = dict(out)
    expected = ([[1.5] * 3] * 2, [0.0, 1.5, 3.0, 4.5], [5.0], [5.0] * 3, True)
    assert results == {0: expected, 1: expected}


def test_collective_helpers_are_identity_in_one_process():
    from dhkd.distributed import all_reduce_mean_, broadcast_tensors
    t = torch.tensor([2.0, 4.0])
    all_reduce_mean_([t])
    broadcast_tensors([t])
    assert t.tolist() == [2.0, 4.0]


@pytest.mark.parametrize("method,aux_head,wrapped_aux", [("dhkd", "linear", {"aux_head"}),
                                                          ("dhkd", "mlp", {"aux_head", "aux_mlp"}),
                                                          ("kd", "linear", set()), ("ce", "mlp", set())])
def test_trained_parts_hold_what_the_method_trains(method, aux_head, wrapped_aux):
    """DDP wraps backbone + main head (+ the aux head and its MLP for dhkd), never the teacher."""
    from dhkd.config import LossConfig
    from dhkd.distill import Distiller
    from dhkd.distributed import TrainedParts
    from dhkd.models import build_student
    student = build_student("mnist1d_mlp", num_classes=10, aux_head=aux_head)
    teacher = None if method == "ce" else torch.nn.Linear(40, 10)
    parts = TrainedParts(Distiller(student, teacher, LossConfig(), method))
    assert {n.split(".")[0] for n, _ in parts.named_parameters()} == {"backbone", "head"} | wrapped_aux
    ids = {id(p) for p in parts.parameters()}
    assert ids <= {id(p) for p in student.parameters()}
    if teacher is not None:
        assert not ids & {id(p) for p in teacher.parameters()}
    x = torch.randn(4, 40)
    _, out = parts(x, torch.randint(0, 10, (4,)), 0)
    assert out["loss"].requires_grad


def test_attempt_store_separates_restart_attempts(monkeypatch):
    """Under a torchrun agent each restart attempt sees its own keys of the agent's store."""
    from dhkd.distributed import _attempt_store
    for k in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    timeout = datetime.timedelta(seconds=10)
    assert _attempt_store(2, timeout) is None
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timeout, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = _attempt_store(1, timeout)
    first.set("addr", "old")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = _attempt_store(1, timeout)
    assert second.check(["addr"]) is False and first.check(["addr"]) is True
    del server


def test_fault_injection_fires_once_on_its_rank(monkeypatch):
    from dhkd import distributed
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", lambda code: exits.append(code))
    monkeypatch.delenv("DHKD_FAULT_AT_STEP", raising=False)
    distributed.maybe_inject_fault(3, 1)
    monkeypatch.setenv("DHKD_FAULT_AT_STEP", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    distributed.maybe_inject_fault(2, 1)
    distributed.maybe_inject_fault(3, 0)
    assert exits == []
    distributed.maybe_inject_fault(3, 1)
    assert exits == [1]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restarted job runs through
    distributed.maybe_inject_fault(3, 1)
    assert exits == [1]


def test_cli_resume_auto(tmp_path, dhkd_cache, capsys):  # noqa: F811
    """--resume auto starts fresh without OUT/last.pt and continues with it; '--resume key=value' is
    still the plain flag followed by an override; overrides may sit on both sides of --out."""
    from dhkd.cli import main
    out = tmp_path / "run"
    base = ["--config", str(CONFIGS / "mnist1d/kd.yaml"), *FAST, "train.epochs=2",
            "train.max_steps_per_epoch=2", "--out", str(out), "data.batch_size=64"]
    assert main(["train", *base, "--resume", "auto", "train.stop_after_epoch=1"]) == 0
    first = capsys.readouterr().out
    assert "resumed" not in first and json.loads(first.strip().splitlines()[-1])["epoch"] == 1
    assert main(["train", *base, "--resume", "auto"]) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and json.loads(second.strip().splitlines()[-1])["epoch"] == 2
    assert main(["train", *base, "--resume", "train.epochs=3"]) == 0
    third = capsys.readouterr().out
    assert "resumed from" in third and json.loads(third.strip().splitlines()[-1])["epoch"] == 3
    cfg = load_config(out / "config.yaml")
    assert cfg.data.batch_size == 64


def test_trainer_rejects_bad_resume_value(tmp_path):  # raises before any data is built
    from dhkd.train import Trainer
    with pytest.raises(ValueError, match="resume"):
        Trainer(load_config(CONFIGS / "mnist1d/ce.yaml", FAST), tmp_path, resume="yes")


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path, dhkd_cache):  # noqa: F811
    """SyncBatchNorm has no CPU kernels: a distributed CPU run with train.sync_bn=true stops at once."""
    from dhkd.config import ConfigError
    from dhkd.train import Trainer
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ConfigError, match="sync_bn"):
            Trainer(load_config(CONFIGS / "mnist1d/ce.yaml", FAST + ["train.sync_bn=true"]), tmp_path,
                    rank=0, world_size=2, log=lambda m: None)
    finally:
        dist.destroy_process_group()
    Trainer(load_config(CONFIGS / "mnist1d/ce.yaml", FAST + ["train.sync_bn=true", "train.epochs=1"]),
            tmp_path / "one", log=lambda m: None)  # one process: nothing to synchronize, accepted
