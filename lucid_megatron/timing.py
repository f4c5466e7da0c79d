"""Wall-clock timing for benchmarks and demos (never for pass/fail tests)."""

from __future__ import annotations

import platform
import statistics
import time


def median_seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (for benchmark headers)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def current_rss_bytes() -> int:
    return _proc_status("VmRSS")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (VmHWM) to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Resident-memory high-water mark since the last :func:`reset_peak_rss` (Linux)."""
    return _proc_status("VmHWM")
