"""Preemption: SIGTERM / SIGUSR1 / SIGINT ask the run to finish its step, save, and exit cleanly.

SLURM sends SIGTERM (and, with ``--signal``, SIGUSR1 ahead of the time limit); Ctrl-C sends SIGINT (a second
Ctrl-C aborts at once, without saving).  The handler only sets
a flag; the training loop checks it between steps and all ranks agree through one all-reduce (on the
runtime's device: NCCL takes no CPU tensors), so every rank saves the same step.

``lucid train`` holds one flag from before the process group starts until the process ends, final_eval
included: a warning signal that arrives between two phases is remembered, never the default action
(which would kill the process and leave the job script a run in no known state).
"""

from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if name == "SIGINT":
            print("lucid train: Ctrl-C: finishing this step and saving (Ctrl-C again to abort without saving)",
                  flush=True)
        self.received = self.received or name

    def agreed(self, runtime) -> bool:
        """True on every rank if any rank received a preemption signal (collective)."""
        return runtime.any_rank(self.received is not None)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
