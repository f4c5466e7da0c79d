"""Run ``lucid train`` under torchrun on this machine, forwarding preemption signals to the workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def train_arguments(config: str, run_dir: str, overrides: list[str], resume: str | None) -> list[str]:
    args = ["train", config, "--run-dir", str(run_dir)]
    for assignment in overrides:
        args += ["--set", assignment]
    if resume:
        args += ["--resume", resume]
    return args


def run_torchrun(nproc_per_node: int, arguments: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m lucid_megatron ARGUMENTS``; returns its exit code.

    SIGTERM/SIGUSR1 sent to this process go to torchrun's worker processes, which save a checkpoint
    and exit 0 (torchrun itself would stop the workers on SIGTERM instead of letting them save).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc_per_node}", "-m", "lucid_megatron", *arguments]
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    proc = subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS=threads))

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

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
