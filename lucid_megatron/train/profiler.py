"""A profiler trace of chosen training steps: ``train.profile_steps: A-B`` (``lucid train --profile-steps A-B``).

Every rank records steps A to B with ``torch.profiler`` (CPU activity, and CUDA kernels on a GPU) and writes a
Chrome trace, ``RUN_DIR/profile/steps_A-B/rank_K.trace.json`` (open it in https://ui.perfetto.dev or
chrome://tracing); on a GPU also a CUDA memory snapshot, ``rank_K.memory.pickle`` (https://pytorch.org/memory_viz).
Our own work carries names in the trace: ``lucid::step_N``, ``lucid::data``, ``lucid::forward``,
``lucid::backward``, ``lucid::solve`` and ``lucid::solve_backward`` (the LUCID preconditioner; under context
parallelism also ``lucid::solve_earlier`` and ``lucid::solve_backward_earlier``, its pipelined parts),
``lucid::cp_all_to_all`` / ``lucid::cp_ring_send_recv`` / ``lucid::cp_ring_wait`` / ``lucid::cp_broadcast``
(context-parallel communication) and ``lucid::deepspeed_step`` (the optimizer).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    """Profiles the steps of ``steps`` (A, B) on this rank; a no-op for every other step (and for None)."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: Path, rank: int, device: torch.device):
        self.steps = steps
        self.rank = rank
        self.cuda = torch.device(device).type == "cuda"
        self.out_dir = None if steps is None else Path(run_dir) / "profile" / f"steps_{steps[0]}-{steps[1]}"
        self._profile = None

    @contextlib.contextmanager
    def step(self, step: int):
        """Around one training step: starts the profiler at A, names the step, writes the trace after B."""
        if self.steps is None or not self.steps[0] <= step <= self.steps[1]:
            yield
            return
        if self._profile is None:
            self._start()
        with record_function(f"lucid::step_{step}"):
            yield
        if step == self.steps[1]:
            self._write()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        # Shapes and allocations would make the trace of a small model's step tens of MB; on a GPU the memory
        # snapshot below records the allocations instead.
        self._profile = profile(activities=activities)
        self._profile.start()

    def _write(self) -> None:
        self._profile.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank_{self.rank}.trace.json"
        self._profile.export_chrome_trace(str(trace))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.out_dir / f"rank_{self.rank}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self._profile = None
        if self.rank == 0:
            print(f"lucid train: profile of steps {self.steps[0]}-{self.steps[1]} written to {self.out_dir} "
                  "(open the rank_K.trace.json files in https://ui.perfetto.dev)", flush=True)

    def close(self) -> None:
        """A run that ends inside the range still writes what it recorded."""
        if self._profile is not None:
            self._write()
