"""The run directory (``--out``): one writer, atomic checkpoints, ``metrics.jsonl`` and resume bookkeeping.

    run = RunDir("runs/x", is_main=rank == 0)   # creates runs/x, locks it (rank 0 only)
    run.start_fresh(cfg) | ckpt = run.checkpoint_for_resume(cfg)
    run.metrics.write(row); run.save(state, is_best); run.save_student(state)
    run.close()                                  # releases the lock

One writer: rank 0 holds an advisory ``fcntl.flock`` on ``OUT/.dhkd.lock`` for the run's life (the
other torchrun ranks write nothing and take no lock); a second process gets ``RunDirLocked`` naming
the holder's pid. Temporaries ``.NAME.PID.tmp`` are removed only when process PID is gone. A start
that fails (``close(failed=True)``) removes the directories it created when nothing else is in them.
"""
from __future__ import annotations

import errno
import fcntl
import importlib.util
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import torch

from .atomic import DiskFullError, atomic_write_bytes, atomic_write_text, is_disk_full, write_all

CHECKPOINT_FORMAT = 1
RUN_KEYS = (("method",), ("student", "name"), ("student", "aux_head"), ("data", "dataset"))
LOCK_NAME = ".dhkd.lock"
TMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


# Settings that do not change what a run learns (a teacher trained with other values is the same teacher).
NOT_TRAINING_KEYS = {"train": ("progress", "tensorboard", "log_every", "device", "eval_teacher", "diagnostics",
                               "diagnostics_samples", "stop_after_epoch"),
                     "data": ("workers", "pin_memory", "root"), "teacher": ("train_config",)}


def training_settings(config: dict) -> dict:
    """``to_dict(cfg)`` without the ``NOT_TRAINING_KEYS``: equal for two runs that learn the same."""
    return {section: ({k: v for k, v in values.items() if k not in NOT_TRAINING_KEYS.get(section, ())}
                      if isinstance(values, dict) else values) for section, values in config.items()}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, of another format or run, or stale."""


class RunDirError(RuntimeError):
    """A run directory that cannot be used: not a directory, not writable, or locked by another process."""


class RunDirLocked(RunDirError):
    """Another live process holds the run directory's lock (``pid``: its process id, or None)."""

    def __init__(self, msg: str, pid: int | None):
        super().__init__(msg)
        self.pid = pid


# ---------------------------------------------------------------- checks and files

def out_dir_problems(out, label: str = "--out") -> list[str]:
    """Why directory ``out`` cannot be created or written (empty list: it can): a file, a file among
    its parents, or a nearest existing directory this process cannot write (permissions, read-only
    mount). ``label`` names the argument in the message."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return [f"{label} {out} is a file, not a directory"]
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return [f"{label} {out}: {anc} is a file, not a directory"]
    if not os.access(anc, os.W_OK | os.X_OK):
        how = "a read-only file system" if _read_only_mount(anc) else "permission denied"
        return [f"{label} {out}: {anc} is not writable ({how})"]
    return []


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _os_problem(out: Path, exc: OSError) -> RunDirError:
    if is_disk_full(exc):
        return DiskFullError(exc.filename or out)
    reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "a read-only file system"}.get(exc.errno, exc.strerror or str(exc))
    return RunDirError(f"--out {out}: cannot write there ({reason})")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(directory) -> list[Path]:
    """Remove ``.NAME.PID.tmp`` files (left by a process killed mid-write) whose process is gone;
    those of live processes are kept. Returns the removed paths."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        m = TMP_NAME.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class FileLock:
    """An exclusive advisory ``fcntl.flock`` on ``path``, which holds the holder's ``pid host``.

    ``acquire(wait=False)`` raises ``RunDirLocked`` when another process holds it; ``wait=True``
    blocks until it is free (``on_wait(pid)`` is called once first). Released by ``release()`` or when
    the process exits. The file is never deleted while it may be in use; a holder checks that the path
    still names the file it locked.
    """

    def __init__(self, path, what: str = "run directory"):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None
        self.supported = True

    def holder(self) -> tuple[int | None, str | None]:
        """(pid, host) written by the holder, (None, None) when unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").split()
            return int(text[0]), (text[1] if len(text) > 1 else None)
        except (OSError, ValueError, IndexError):
            return None, None

    def acquire(self, *, wait: bool = False, on_wait=None, timeout_s: float = 0.0) -> "FileLock":
        """``timeout_s`` > 0 (without ``wait``): retry that long before refusing."""
        deadline = time.monotonic() + timeout_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid, host = self.holder()
                    if not wait and time.monotonic() < deadline:
                        os.close(fd)
                        time.sleep(0.2)
                        continue
                    if not wait:
                        on = f" on {host}" if host and host != socket.gethostname() else ""
                        raise RunDirLocked(
                            f"{self.what} {self.path.parent} is in use by process {pid if pid else '(unknown pid)'}"
                            f"{on} (its lock {self.path.name}); wait for it to finish, stop it, or use "
                            f"another --out", pid) from None
                    if on_wait is not None:
                        on_wait(pid)
                        on_wait = None
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # removed (a failed start cleaning up) between our open and our lock
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                write_all(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self.fd = fd
                return self
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_LOCKS:  # a file system without flock: run unlocked
                    self.supported = False
                    return self
                raise
            except BaseException:
                os.close(fd)
                raise

    def release(self, *, remove: bool = False) -> None:
        if self.fd is None:
            return
        if remove:  # only a start that created the directory: nobody else has used this file
            self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(obj, path) -> None:
    """``torch.save`` into memory, then written to ``.NAME.PID.tmp``, fsynced and moved onto ``path``
    (``os.replace``): ``path`` holds the old checkpoint or the new one. ``DiskFullError`` when the disk
    is full; ``RunDirError`` naming ``path`` when torch's own writer fails without an errno."""
    path = Path(path)
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(path, buf.getbuffer(), fsync=True)
    except (DiskFullError, RunDirError):
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        if isinstance(exc, RuntimeError) and "write" in str(exc) and "inline_container" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise RunDirError(f"could not write {path}: {first} (no space left on device?); the previous "
                              f"{path.name}, if any, is unchanged") from exc
        raise


def read_checkpoint_file(path):
    """The object in a checkpoint file, on the CPU (``torch.load(weights_only=True)``): the one way
    every checkpoint is read (resume, ``dhkd eval``, teachers). CheckpointError, one line, when the
    file is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, disallowed globals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt file?): {type(exc).__name__}: "
            f"{first[:200]}; a file that pickles other objects (e.g. an argparse Namespace) cannot load "
            f"with weights_only=True: re-save just the state dict") from exc


def load_checkpoint(path) -> dict:
    """A trainer checkpoint (``read_checkpoint_file``); CheckpointError when unusable."""
    path = Path(path)
    ckpt = read_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a dhkd trainer checkpoint (no format_version)")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']}, this dhkd reads "
                              f"format {CHECKPOINT_FORMAT}")
    return ckpt


# ---------------------------------------------------------------- metrics.jsonl

def _epoch_ok(row) -> bool:
    e = row.get("epoch", 0)
    return isinstance(e, int) and not isinstance(e, bool)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars under ``tb/``.

    ``rows()`` keeps every readable row: a line that is not a JSON object with an int ``epoch`` (cut
    by a crash, garbled) is skipped with one warning naming its line number. TensorBoard is opened on
    the first row; when it is asked for but not installed, one line says it is off and why.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, log=print):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self.tb = None
        self._log = log
        self._warned = False
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            self.tensorboard = False
            log("[dhkd] TensorBoard off: the tensorboard package is not installed (pip install tensorboard, "
                "or set train.tensorboard=false)")

    def _open_tensorboard(self) -> None:
        self.tensorboard = False
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(self.path.parent / "tb"))

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows, bad = [], []
        for n, line in enumerate(self.path.read_bytes().split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                bad.append(n)
                continue
            if not isinstance(row, dict) or not _epoch_ok(row):
                bad.append(n)
                continue
            rows.append(row)
        if bad and not self._warned:
            self._warned = True
            where = f"line {bad[0]}" if len(bad) == 1 else f"lines {', '.join(map(str, bad))}"
            self._log(f"[dhkd] warning: {self.path} {where} {'is' if len(bad) == 1 else 'are'} not a readable "
                      f"JSON row: skipped, the {len(rows)} readable rows are kept")
        return rows

    def truncate_after(self, epoch: int) -> None:
        """Keep the readable rows of epochs up to ``epoch`` (dropping those of an interrupted epoch and
        unreadable lines), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in self.rows() if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.path, ": the rows before this one are kept") from exc
            raise
        if self.tensorboard:
            self._open_tensorboard()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k if "/" in k else f"{row.get('kind', 'train')}/{k}", v, row.get("step", 0))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ---------------------------------------------------------------- the run directory

class RunDir:
    """``OUT`` of one run: lock, config.yaml, metrics.jsonl, last.pt / best.pt / student.pt.

    Only the main process (rank 0) creates, locks and writes; on other ranks every write is a no-op.
    Raises ``RunDirError`` (a file, not writable, locked by a live process) before anything is written.
    """

    def __init__(self, out, *, is_main: bool = True, tensorboard: bool = False, log=print,
                 lock_timeout_s: float = 0.0):
        self.out = Path(out)
        self.is_main = is_main
        self._log = log
        self.created: list[Path] = []
        self.lock = FileLock(self.out / LOCK_NAME)
        if is_main:
            problems = out_dir_problems(self.out)
            if problems:
                raise RunDirError(problems[0])
            try:
                self._makedirs()
                self.lock.acquire(timeout_s=lock_timeout_s)
            except RunDirError:
                self._remove_created()
                raise
            except OSError as exc:
                self._remove_created()
                raise _os_problem(self.out, exc) from exc
            if not self.lock.supported:
                log(f"[dhkd] warning: {self.out}'s file system has no flock: the run directory is not locked")
            remove_stale_temporaries(self.out)
        self.metrics = MetricsLog(self.out, is_main, tensorboard, log)

    def _makedirs(self) -> None:
        missing = []
        p = self.out
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self.created.append(d)

    def _remove_created(self) -> None:
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:  # not empty: someone else wrote there
                break
        self.created = []

    @property
    def last(self) -> Path:
        return self.out / "last.pt"

    def close(self, *, failed: bool = False) -> None:
        """Release the lock. ``failed=True`` (a start that failed before training): also remove the
        directories this RunDir created, when they hold nothing but the lock."""
        self.metrics.close()
        if failed and self.created:
            for name in ("config.yaml", "metrics.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            self.lock.release(remove=True)
            self._remove_created()
        self.lock.release()

    # -------------------------------------------------- start
    def start_fresh(self, config_text: str) -> None:
        """A new run: ``config.yaml`` written, ``metrics.jsonl`` emptied."""
        if not self.is_main:
            return
        atomic_write_text(self.out / "config.yaml", config_text)
        self.metrics.truncate_after(-1)

    def checkpoint_for_resume(self, config: dict) -> dict:
        """``last.pt`` of this run, checked against ``config`` (``to_dict`` of the new config: same
        method, student and dataset) and against ``metrics.jsonl`` (not older than an epoch it
        records as completed). CheckpointError otherwise."""
        path = self.last
        ckpt = load_checkpoint(path)
        saved = ckpt.get("config", {})
        for keys in RUN_KEYS:
            a, b = saved, config
            for k in keys:
                a, b = (a or {}).get(k), (b or {}).get(k)
            if a != b:
                raise CheckpointError(f"{path} was written by a run with {'.'.join(keys)}={a!r}, "
                                      f"but this config has {b!r}")
        epoch = int(ckpt["epoch"])
        done = self.completed_epochs()
        if done and max(done) > epoch:
            raise CheckpointError(
                f"{path} is from epoch {epoch}, but {self.metrics.path} records completed epoch {max(done)}: "
                f"the checkpoint is older than the run (was last.pt replaced?); refusing to resume")
        return ckpt

    def completed_epochs(self) -> list[int]:
        return [r["epoch"] for r in self.metrics.rows() if r.get("kind") == "eval"]

    def finish_resume(self, ckpt: dict) -> None:
        """Drop rows of the interrupted epoch; put back the checkpoint's own eval row when the process
        died between writing last.pt and its metrics.jsonl row."""
        if not self.is_main:
            return
        epoch = int(ckpt["epoch"])
        done = self.completed_epochs()
        self.metrics.truncate_after(epoch)
        row = ckpt.get("metrics") or {}
        if epoch and row.get("epoch") == epoch and epoch not in done:
            self.metrics.write(row)

    # -------------------------------------------------- writes
    def save(self, state: dict, is_best: bool) -> None:
        """``best.pt`` (on a new best) before ``last.pt``: a crash between the two never leaves a
        ``last.pt`` whose ``best_acc1`` names an epoch that ``best.pt`` does not hold."""
        if not self.is_main:
            return
        if is_best:
            save_checkpoint(state, self.out / "best.pt")
        save_checkpoint(state, self.last)

    def save_student(self, state: dict) -> None:
        if self.is_main:
            save_checkpoint(state, self.out / "student.pt")

    def written(self) -> str:
        """``OUT (a, b, ...)``: what the run directory holds, for the last line of a run."""
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in self.out.iterdir()
                       if not p.name.startswith(".")) if self.out.is_dir() else []
        return f"{self.out} ({', '.join(names)})" if names else str(self.out)
