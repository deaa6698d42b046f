"""One job per run folder: an exclusive lock file `OUT_DIR/t2i.lock` holding the holder's host, PID and start.

    lock = acquire_run_lock(out_dir)     # RunFolderBusyError naming the holder if another job has it
    try: ... train ...
    finally: lock.release()

The lock is an `flock` on the file, so the kernel drops it when the holding process dies, however it dies
(kill -9 included): a lock file left behind by a dead job is stale by construction and is taken over, with
a log line naming the previous holder. Where `flock` is not available (no fcntl, or a filesystem that
refuses it), the file is created exclusively instead and a holder on this host whose PID no longer runs is
treated as stale; a holder on another host must be removed by hand, which the error message says.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from t2i.errors import RunFolderBusyError

log = logging.getLogger("t2i.train")

LOCK_FILE = "t2i.lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@dataclass
class RunLock:
    """A held run-folder lock; `release()` (idempotent) removes the file and drops the lock."""

    path: Path
    fd: int | None
    previous: dict | None = None  # the stale holder taken over, if any

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked, so no one can lock this inode and find it unlinked later
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:  # noqa: PYI034 (no Self on Python 3.10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_info() -> dict:
    """What the lock file records about this process."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "another job (the lock file names no holder yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def acquire_run_lock(out_dir: str | Path) -> RunLock:
    """Lock `out_dir` for this process (creating the folder); RunFolderBusyError if another job holds it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE
    if fcntl is not None:
        lock = _acquire_flock(path)
        if lock is not None:
            return lock
    return _acquire_exclusive_file(path)


def _busy(path: Path, holder: dict | None, hint: str = "") -> RunFolderBusyError:
    return RunFolderBusyError(f"trainer.out_dir {path.parent}: in use by {describe_holder(holder)} (lock {path}); "
                              f"stop that job or choose another out_dir{hint}")


def _acquire_flock(path: Path) -> RunLock | None:
    """The lock through flock, or None when this filesystem does not support flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise _busy(path, holder) from None
        except OSError:  # ENOLCK / ENOTSUP: flock does not work here
            os.close(fd)
            return None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder released (unlinked) it between our open and flock: retry
            os.close(fd)
            continue
        previous = _read(fd)
        _write(fd, holder_info())
        if previous:
            log.warning("run folder %s: took over the stale lock of %s (no longer running)", path.parent,
                     describe_holder(previous))
        return RunLock(path, fd, previous)


def _acquire_exclusive_file(path: Path) -> RunLock:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_path(path)
            if holder and holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid")):
                log.warning("run folder %s: removing the stale lock of %s", path.parent, describe_holder(holder))
                path.unlink(missing_ok=True)
                continue
            raise _busy(path, holder, f"; if that job is dead, delete {path}") from None
        _write(fd, holder_info())
        return RunLock(path, fd)
    raise _busy(path, _read_path(path))


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 4096):
            data += chunk
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _read_path(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) or None
    except (OSError, ValueError):
        return None


def _write(fd: int, info: dict) -> None:
    data = json.dumps(info).encode("utf-8") + b"\n"
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)
