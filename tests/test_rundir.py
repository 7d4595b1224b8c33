"""The run directory: one writer (the lock), live temporaries kept, metrics history kept past a garbled
line, a full disk and an unusable --out as one-line errors with exit status 2."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from dhkd.atomic import DiskFullError, atomic_write_text
from dhkd.cli import main
from dhkd.config import load_config
from dhkd.rundir import (LOCK_NAME, FileLock, MetricsLog, RunDir, RunDirError, RunDirLocked, load_checkpoint,
                         save_checkpoint)
from dhkd.train import Trainer
from tests.trainer_helpers import CONFIGS, FAST

QUIET = dict(log=lambda m: None)
SHORT = FAST + ["train.epochs=2", "train.max_steps_per_epoch=2", "train.eval_teacher=false"]
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} host\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    """MNIST-1D generated once for this module, outside ~/.cache; method ce needs no teacher."""
    monkeypatch.setenv("DHKD_CACHE", str(tmp_path_factory.getbasetemp() / "rundir_cache"))


def train_args(out, *extra, method="ce"):
    return ["train", "--config", str(CONFIGS / f"mnist1d/{method}.yaml"), "--out", str(out), *SHORT, *extra]


@pytest.fixture
def lock_holder(tmp_path):
    """A separate process holding OUT's lock, as a running ``dhkd train`` would."""
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc.pid
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(lock_holder, capsys):
    out, pid = lock_holder
    assert main(train_args(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by process {pid}" in err[0] and str(out) in err[0]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, nothing deleted


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path):
    cfg = load_config(CONFIGS / "mnist1d/ce.yaml", SHORT)
    first = Trainer(cfg, tmp_path / "run", **QUIET)
    with pytest.raises(RunDirLocked, match=f"in use by process {os.getpid()}"):
        Trainer(cfg, tmp_path / "run", **QUIET)
    first.fit()
    second = Trainer(cfg, tmp_path / "run", resume=True, **QUIET)  # released by fit
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "eval"] == [1, 2]
    second.fit()


def test_other_ranks_take_no_lock(tmp_path):
    """torchrun's ranks share rank 0's lock: a rank > 0 neither creates, locks nor writes OUT."""
    rank0 = RunDir(tmp_path / "run", is_main=True, log=lambda m: None)
    rank1 = RunDir(tmp_path / "run", is_main=False, log=lambda m: None)
    rank1.metrics.write({"kind": "eval", "epoch": 1})
    assert rank1.lock.fd is None and not (tmp_path / "run" / "metrics.jsonl").exists()
    rank0.close()


def test_temporaries_of_live_processes_are_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    try:
        out = tmp_path / "run"
        out.mkdir()
        live = out / f".last.pt.{sleeper.pid}.tmp"
        dead = out / f".last.pt.{dead_pid}.tmp"
        dead_metrics = out / f".metrics.jsonl.{dead_pid}.tmp"
        for p in (live, dead, dead_metrics):
            p.write_bytes(b"partial")
        RunDir(out, log=lambda m: None).close()
        assert live.is_file() and not dead.exists() and not dead_metrics.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lock_waiters_wait_and_see_the_holders_pid(tmp_path):
    path = tmp_path / ".x.lock"
    first = FileLock(path).acquire()
    seen, got = [], []

    def waiter():
        got.append(FileLock(path).acquire(wait=True, on_wait=seen.append))
    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    assert not got and seen == [os.getpid()]
    first.release()
    t.join(10)
    assert got and got[0].fd is not None
    got[0].release()


def test_a_garbled_metrics_line_keeps_every_other_row(tmp_path):
    """Resume after a line in the middle of metrics.jsonl was garbled: every readable row stays, and
    one warning names the line."""
    out = tmp_path / "run"
    cfg = lambda *o: load_config(CONFIGS / "mnist1d/ce.yaml", SHORT + ["train.log_every=1", *o])  # noqa: E731
    Trainer(cfg("train.stop_after_epoch=1"), out, **QUIET).fit()
    lines = (out / "metrics.jsonl").read_bytes().splitlines()
    assert len(lines) == 3  # train, train, eval
    lines.insert(1, b'{"kind": "train", "ep\xff\xfe garbled')
    (out / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    logs = []
    Trainer(cfg(), out, resume=True, log=logs.append).fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["epoch"]) for r in rows] == [("train", 1), ("train", 1), ("eval", 1),
                                                       ("train", 2), ("train", 2), ("eval", 2)]
    warnings = [m for m in logs if "line 2" in m]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "3 readable rows are kept" in warnings[0]


def test_metrics_rows_skip_non_rows(tmp_path):
    log = MetricsLog(tmp_path, True, False, log=lambda m: None)
    log.path.write_text('{"kind": "eval", "epoch": 1}\n[1, 2]\n{"epoch": "x"}\n\n{"kind": "eval", "epoch": 2}\n')
    assert [r["epoch"] for r in log.rows()] == [1, 2]


@pytest.fixture
def full_disk(monkeypatch):
    """Files opened for writing whose path contains ``marker`` fail with ENOSPC after a few bytes."""
    import builtins
    real_open = builtins.open
    state = {"marker": None}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:16])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if state["marker"] and state["marker"] in str(file) and any(m in mode for m in "wax"):
            return Full(f)
        return f
    monkeypatch.setattr(builtins, "open", fake_open)
    return state


def test_full_disk_keeps_the_previous_checkpoint_and_exits_2(tmp_path, capsys, full_disk):
    out = tmp_path / "run"
    assert main(train_args(out, "train.stop_after_epoch=1")) == 0
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    full_disk["marker"] = f"{out}/.last.pt."
    assert main(train_args(out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left on device" in err[0] and str(out / "last.pt") in err[0]
    assert (out / "last.pt").read_bytes() == before and load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    full_disk["marker"] = None
    assert main(train_args(out, "--resume")) == 0  # the lock was released; the run finishes
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_full_disk_on_every_kind_of_write(tmp_path, full_disk):
    full_disk["marker"] = str(tmp_path)
    with pytest.raises(DiskFullError, match=f"no space left on device: could not write {tmp_path / 'a.pt'}"):
        save_checkpoint({"x": torch.zeros(3)}, tmp_path / "a.pt")
    with pytest.raises(DiskFullError, match="config.yaml"):
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        MetricsLog(tmp_path, True, False).write({"epoch": 1})
    assert not list(tmp_path.glob(".*.tmp"))


def test_full_disk_raised_by_torch_save_itself(tmp_path, monkeypatch):
    def enospc(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", enospc)
    with pytest.raises(DiskFullError, match="no space left on device"):
        save_checkpoint({}, tmp_path / "a.pt")

    def writer_failed(obj, f):  # torch's C++ writer: no errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", writer_failed)
    with pytest.raises(RunDirError, match=f"could not write {tmp_path / 'a.pt'}: .*file write failed"):
        save_checkpoint({}, tmp_path / "a.pt")


def test_out_that_is_a_file_or_not_writable_is_one_line(tmp_path, capsys, monkeypatch):
    target = tmp_path / "file"
    target.write_text("x")
    for out, expected in ((target, f"--out {target} is a file"),
                          (target / "sub", f"--out {target / 'sub'}: {target} is a file")):
        assert main(train_args(out, "teacher.checkpoint=" + str(tmp_path / "never.pt"), method="dhkd")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "never.pt").exists() and not (tmp_path / "never_run").exists()
    # read-only: a chmod 555 folder (non-root), and a read-only mount as access() reports it (any user)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(ro) else real_access(p, mode, **k))
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_flag": os.ST_RDONLY})())
    assert main(train_args(ro / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{ro} is not writable (a read-only file system)" in err[0]
    assert not (ro / "run").exists()


def test_unwritable_out_found_only_when_writing_is_one_line(tmp_path, monkeypatch):
    """access() can say yes where the write fails (root on a read-only export, ACLs): the lock's own
    write is the test, and its error is a RunDirError naming --out."""
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if str(path).startswith(str(tmp_path / "run")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", read_only)
    assert main(train_args(tmp_path / "run")) == 2
    assert not (tmp_path / "run").exists()
