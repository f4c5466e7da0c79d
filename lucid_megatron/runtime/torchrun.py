"""Run ``lucid train`` (or ``lucid eval``) under torchrun on this machine; preemption signals reach the workers.

The argument lists come from ``runtime/commands.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import psutil

from .commands import torchrun_command
from .lifetime import die_with_parent
from .process import threads_per_process

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def run_torchrun(nproc_per_node: int, arguments: list[str], *, stop_grace_s: float = 300.0) -> int:
    """``torchrun --standalone --nproc-per-node N -m lucid_megatron ARGUMENTS``; returns its exit code.

    SIGTERM/SIGUSR1/SIGINT sent to this process go to torchrun's worker processes, which save a checkpoint
    and exit 0 (torchrun itself would stop the workers on SIGTERM instead of letting them save). After
    SIGTERM or SIGINT the workers get ``stop_grace_s`` seconds; then the whole tree is killed (SIGKILL),
    saying so, so that a worker stuck in a collective cannot keep the job alive.
    """
    command = torchrun_command(nproc_per_node, arguments)
    # Each worker gets its share of the cores (torchrun would set 1, with a warning, when this is unset).
    threads = threads_per_process(nproc_per_node)
    # SIGTERM to torchrun if this process dies without forwarding (SIGKILL): no orphaned workers (lifetime.py).
    proc = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    deadline: list[threading.Timer] = []

    def kill_tree():
        try:
            tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        except psutil.NoSuchProcess:
            return
        print(f"lucid: the workers did not stop within {stop_grace_s:g} s of the stop signal "
              "(launch.stop_grace_s); killing them (SIGKILL)", file=sys.stderr, flush=True)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def forward(signum, frame):
        try:
            workers = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return
        for worker in workers or [psutil.Process(proc.pid)]:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        if signum in (signal.SIGTERM, signal.SIGINT) and not deadline:
            deadline.append(threading.Timer(stop_grace_s, kill_tree))
            deadline[0].daemon = True
            deadline[0].start()

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return proc.wait()
    finally:
        for timer in deadline:
            timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
