"""Where each rank's step time goes, gathered every logging interval, and the slow ranks named.

Each rank adds up, per step: waiting for data (``data_wait``: the loader and the copy to the device), the
forward and backward passes (``compute``), the optimizer (``optimizer``), the checkpoint's hold on training
(``checkpoint``: a synchronous save, or staging and publishing a background one) and, inside those, the time
spent in the step's own collectives (``collective_wait``: the loss and weight sums, the non-finite checks, the
preemption check).  A rank's **own time** is the sum of the first four less ``collective_wait``: in synchronous
training every rank's step takes as long as the slowest one's, and the others spend the difference waiting in
those collectives (each forward pass ends in one), so the own time is what tells the slow rank apart.

Sections are host times.  On a GPU the host runs ahead of the device and a section's device work is counted
where the host next waits for it (the collectives read their result on the host, so each forward pass is counted
in its micro-batch); ``collective_wait`` is measured with CUDA events on the device stream there (read back at
the logging step, never synchronising a step), on the host clock on CPU.  DeepSpeed's own gradient reduction is
not one of the step's collectives: a rank that waits in it shows the wait as compute.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

SECTIONS = ("data_wait", "compute", "optimizer", "checkpoint")
# Per-step means, one row per rank; validation passes (``evaluation``) are timed beside the steps, not in them.
COLUMNS = ("step", *SECTIONS, "collective_wait", "evaluation")


class StepTimes:
    """This rank's section times since the last :meth:`take`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._events = self.device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys(COLUMNS, 0.0)
        self.steps = 0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._in_step = False

    @contextlib.contextmanager
    def section(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - started

    @contextlib.contextmanager
    def step(self):
        """One training step (its collectives are counted while it runs)."""
        started = time.perf_counter()
        self._in_step = True
        try:
            yield
        finally:
            self._in_step = False
            self.totals["step"] += time.perf_counter() - started
            self.steps += 1

    @contextlib.contextmanager
    def collective(self):
        """Around one of the step's collectives (``Runtime.all_reduce`` calls it); outside a step: not counted."""
        if not self._in_step:
            yield
            return
        if self._events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((start, end))
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.totals["collective_wait"] += time.perf_counter() - started

    def take(self) -> list[float]:
        """Per-step means of :data:`COLUMNS` since the last call, and start again (the events recorded so far
        have completed: the step's last collective was read on the host)."""
        if self._pending:
            self.totals["collective_wait"] += sum(s.elapsed_time(e) for s, e in self._pending) / 1000.0
        steps = max(self.steps, 1)
        row = [self.totals[name] / steps for name in COLUMNS]
        self.reset()
        return row


def own_time(row: Sequence[float]) -> float:
    """A rank's own work per step: its sections less the time it waited in the step's collectives."""
    values = dict(zip(COLUMNS, row))
    return max(sum(values[name] for name in SECTIONS) - values["collective_wait"], 0.0)


def gather_rows(row: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's row, on every rank (one all-gather of a few floats on the runtime's device)."""
    mine = torch.tensor(list(row), dtype=torch.float64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, mine)
    return [r.tolist() for r in rows]


def rank_time_report(rows: Sequence[Sequence[float]], hosts: Sequence[str],
                     factor: float) -> tuple[dict[str, float], list[str]]:
    """Metrics (slowest rank, spread, median breakdown) and one line per rank slower than ``factor`` x the
    median own time, naming the rank and its host."""
    own = [own_time(row) for row in rows]
    median = statistics.median(own)
    slowest = max(range(len(own)), key=own.__getitem__)
    metrics = {"rank_time/slowest_rank": slowest, "rank_time/slowest_s": own[slowest], "rank_time/median_s": median,
               "rank_time/spread": (own[slowest] - min(own)) / median if median > 0 else 0.0}
    for i, name in enumerate(COLUMNS[1:], start=1):
        metrics[f"time/{name}_s"] = statistics.median(row[i] for row in rows)
    flagged = [r for r, t in enumerate(own) if median > 0 and t > factor * median]
    metrics["rank_time/stragglers"] = len(flagged)
    lines = []
    for r in flagged:
        parts = ", ".join(f"{name.replace('_', ' ')} {value:.3f} s" for name, value in zip(COLUMNS[1:], rows[r][1:]))
        lines.append(f"rank {r} (host {hosts[r]}) is slow: {own[r]:.3f} s of its own work per step, "
                     f"{own[r] / median:.2f}x the median {median:.3f} s (logging.straggler_factor={factor:g}); {parts}")
    return metrics, lines
