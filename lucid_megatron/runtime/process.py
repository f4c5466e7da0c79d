"""Settings every training process makes before the libraries start: DeepSpeed's accelerator, where library
output goes (:mod:`.console`), and how many threads torch uses.

Order matters: ``DS_ACCELERATOR`` must be set before DeepSpeed is first imported, and the routing before
Megatron and DeepSpeed are imported (both speak at import).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .console import claim_console_handlers, route_library_output


def available_cores() -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup CPU quota (containers and SLURM
    often allow fewer CPUs than they show)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota else cores


def _cgroup_cpu_quota() -> int | None:
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "QUOTA PERIOD" or "max ..."
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file is not None:
                fields.append(Path(period_file).read_text().strip())
            quota, period = fields[0], fields[1]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def threads_per_process(local_processes: int) -> int:
    """``OMP_NUM_THREADS`` when set (the user's choice, or the launcher's for its workers); otherwise the
    available cores shared evenly among the ``local_processes`` processes of this machine."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not allowed; set a whole number >= 1, or unset it")
        return int(value)
    return max(1, available_cores() // max(1, local_processes))


def set_threads(local_processes: int) -> int:
    """Use :func:`threads_per_process` threads here, and in the processes this one starts (``OMP_NUM_THREADS``).

    torch's default is every core of the machine in every process: processes sharing a machine then
    oversubscribe it, and OpenMP threads spinning for a core they do not get slow every step down.
    """
    threads = threads_per_process(local_processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def choose_deepspeed_accelerator() -> str:
    """Tell DeepSpeed the accelerator (``cuda`` when CUDA is available, else ``cpu``) unless ``DS_ACCELERATOR``
    is set: left to guess, it warns in every process when it settles on the CPU. Same rule as
    :func:`lucid_megatron.runtime.default_device`."""
    if not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def prepare_training_process(log_file: Path, local_processes: int, *, hold_log: bool = False) -> int:
    """All of the above, in order, for one process of ``lucid train``; returns its thread count.

    ``hold_log``: keep library output in memory until :func:`.console.release_log_file` (after the checks)."""
    choose_deepspeed_accelerator()
    route_library_output(log_file, hold=hold_log)
    import deepspeed  # noqa: F401  (creates its console logger now, so that it can be re-routed)

    claim_console_handlers()
    return set_threads(local_processes)
