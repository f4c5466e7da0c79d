"""One run per run directory: an advisory lock (``RUN_DIR/.lock``) held by the run's rank 0.

Two runs writing one directory delete each other's partial checkpoints and interleave their metrics. The
lock is an ``flock`` on a file, so the kernel releases it when the holder dies, however it dies; the file
records who holds it, for the message. (On network file systems without working ``flock``, e.g. some NFS
mounts, it does not exclude anything; SLURM's single job per run directory still does.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock; the message says which."""


class RunDirLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, "
                "or choose another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_free(run_dir: str | Path) -> None:
    """Raise :class:`RunDirBusy` if a run holds ``run_dir`` now (before starting processes)."""
    if (Path(run_dir) / ".lock").exists():
        RunDirLock(run_dir).acquire().release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
