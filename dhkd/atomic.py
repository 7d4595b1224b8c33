"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left (ENOSPC/EDQUOT) while writing ``path``; the file at ``path`` is left as it was."""

    def __init__(self, path, detail: str = ""):
        self.path = Path(path)
        self.message = (f"no space left on device: could not write {self.path} (the previous "
                        f"{self.path.name}, if any, is unchanged){detail}")
        super().__init__(errno.ENOSPC, self.message, str(self.path))

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from or during is ENOSPC/EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if "No space left on device" in str(exc):  # C++ writers that lose the errno
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield ``.NAME.PID.tmp`` beside ``path`` to write to; on success it replaces ``path``
    (``os.replace``), on an exception it is removed and ``path`` is left as it was. A full disk
    raises ``DiskFullError`` naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_all(fd: int, data) -> None:
    """``os.write`` until every byte of ``data`` is written."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def atomic_write_bytes(path, data, *, fsync: bool = False) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
