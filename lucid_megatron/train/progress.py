"""Where each rank is (step and phase), for the hang watchdog and for the restart supervisor.

Every rank keeps ``RUN_DIR/progress/rank_K.json`` up to date: its host and pid, the step it is on, the phase
it entered last (``training step 12``, ``saving the checkpoint of step 20``, ...) and, when it fails, why.
The file is rewritten in place (one ``pwrite`` of a fixed-size record, no rename: cheap on a shared file system
at every phase change); a reader may catch it half-written and then ignores it.  After a failure the supervisor
(train/restarts.py) reads the files to name the step and the rank.

The watchdog: a thread per rank that, when the rank has not entered a new phase for ``train.hang_timeout_s``,
writes the phase and every thread's Python stack (faulthandler) to the rank's log and ends the process with
:data:`HANG_EXIT_CODE`.  In synchronous training a rank that stops moving stops every other rank within one
collective, so each rank's own clock stands for "no rank has advanced".  A C-level faulthandler timer backs the
thread up (it needs no GIL, for a rank stuck in C code that holds it).
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

HANG_EXIT_CODE = 124  # like timeout(1)
RECORD_BYTES = 1024  # each rewrite covers the whole record (padded), so a shorter one leaves no tail


def progress_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "progress"


def read_progress(run_dir: Path) -> dict[int, dict]:
    """rank -> its last record (records that do not parse, e.g. caught mid-write, are left out)."""
    records = {}
    for path in sorted(progress_dir(run_dir).glob("rank_*.json")):
        try:
            record = json.loads(path.read_bytes().rstrip(b" \n\0"))
            records[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def _kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class RankProgress:
    """This rank's record, and its hang watchdog once :meth:`watch` starts it."""

    def __init__(self, run_dir: Path, rank: int, log_path: Path | None = None):
        self.rank = rank
        self.host = socket.gethostname()
        self.step = 0
        self.phase = "starting"
        self.changed = time.monotonic()
        self.log_path = log_path
        directory = progress_dir(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(directory / f"rank_{rank}.json", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write()

    def enter(self, phase: str, step: int | None = None) -> None:
        """The rank moved on: to ``phase`` (of ``step``, when given)."""
        self.phase = phase
        if step is not None:
            self.step = step
        self.changed = time.monotonic()
        self._write()

    def failed(self, error: str) -> None:
        """Record why this rank stops (the supervisor names it in the restart record)."""
        self._write(error=error)

    def _write(self, **extra) -> None:
        if self._fd is None:
            return
        record = {"rank": self.rank, "host": self.host, "pid": os.getpid(), "step": self.step, "phase": self.phase,
                  "time": time.time(), **extra}
        data = json.dumps(record).encode()[: RECORD_BYTES - 1]
        try:
            os.pwrite(self._fd, data.ljust(RECORD_BYTES - 1) + b"\n", 0)
        except OSError:
            pass  # a full disk must not stop training for a progress note

    # ---- the watchdog ----------------------------------------------------------------------------

    def watch(self, timeout_s: float | None) -> None:
        """Start the watchdog (``timeout_s`` None: none)."""
        if timeout_s is None or self._thread is not None:
            return
        self.timeout_s = timeout_s
        self.changed = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="lucid-hang-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        check = min(max(self.timeout_s / 10, 0.2), 30.0)
        seen = None
        while not self._stop.wait(check):
            if seen != self.changed:  # progress since the last look: re-arm the C-level backup
                seen = self.changed
                faulthandler.dump_traceback_later(self.timeout_s + 60, exit=True, file=sys.stderr)
            idle = time.monotonic() - self.changed
            if idle >= self.timeout_s:
                self._report_hang(idle)

    def _report_hang(self, idle: float) -> None:
        message = (f"lucid train: rank {self.rank} (host {self.host}, pid {os.getpid()}): no progress for "
                   f"{idle:.0f} s (train.hang_timeout_s={self.timeout_s:g}) in phase '{self.phase}' (step {self.step}); "
                   "Python stacks of every thread follow; exiting so that the job restarts")
        self.failed(f"hang: no progress for {idle:.0f} s in phase '{self.phase}'")
        for stream in self._report_streams():
            try:
                print(message, file=stream, flush=True)
                faulthandler.dump_traceback(file=stream, all_threads=True)
                stream.flush()
            except (OSError, ValueError):
                pass
        _kill_children()  # os._exit runs no finalizer: a checkpoint writer's manager process would outlive us
        os._exit(HANG_EXIT_CODE)

    def _report_streams(self):
        """The rank's log file (RUN_DIR/logs/rank_K.log) and the console (the job's log)."""
        streams = [sys.stderr]
        if self.log_path is not None:
            try:
                streams.insert(0, open(self.log_path, "a"))
            except OSError:
                pass
        return streams

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join(timeout=5)
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
