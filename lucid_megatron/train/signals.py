"""Preemption: SIGTERM / SIGUSR1 ask the run to finish its step, save, and exit cleanly.

SLURM sends SIGTERM (and, with ``--signal``, SIGUSR1 ahead of the time limit).  The handler only sets
a flag; the training loop checks it between steps and all ranks agree through one all-reduce, so
every rank saves the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank if any rank received a preemption signal (collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
