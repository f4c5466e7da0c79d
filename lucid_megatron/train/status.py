"""``RUN_DIR/status.json``: what state a run left its directory in, for job scripts and final_eval.

States: running | preempted | stopped | finished | failed.  ``preempted`` asks a job script to requeue (the
resumed run continues from the saved step); the others end the job (lucid_megatron/launch/slurm.sbatch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lucid_megatron import atomic

STATES = ("running", "preempted", "stopped", "finished", "failed")


def write_status(run_dir: Path, state: str, step: int) -> None:
    """Replace the status atomically (a job script never reads half a file).  One process writes it."""
    if state not in STATES:
        raise ValueError(f"run state {state!r}: expected one of {', '.join(STATES)}")
    atomic.write_text(Path(run_dir) / "status.json", json.dumps({"state": state, "step": step, "time": time.time()}))


def read_status(run_dir: Path) -> dict | None:
    """The last status written, or None before the first."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except FileNotFoundError:
        return None
