"""Processes that do not outlive the one that started them (Linux's parent-death signal).

``lucid train`` starts torchrun, which starts the workers. If ``lucid train`` is killed with SIGKILL it cannot
forward anything, and without this torchrun and its workers would live on as orphans: training, writing the
run directory and holding its lock. So torchrun gets SIGTERM when ``lucid train`` dies (it then stops its
workers, which save a checkpoint on SIGTERM, within its own 30 s), and each worker gets SIGKILL when torchrun
dies (with torchrun gone there is no one left to coordinate a save).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Looked up before any fork: a child between fork and exec should only call into what is already loaded.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; False where that is unavailable."""
    if _prctl is None:
        return False
    return _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def exit_if_orphaned(parent_pid: int) -> None:
    """After :func:`die_with_parent`: a parent that died before it was called sent nothing, so look."""
    if os.getppid() != parent_pid:
        os._exit(1)
