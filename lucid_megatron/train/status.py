"""``RUN_DIR/status.json``: what state a run left its directory in, for job scripts, the restart supervisor and
final_eval.

States: running | preempted | stopped | finished | failed.  ``preempted`` asks a job script to requeue (the
resumed run continues from the saved step); the others end the job (lucid_megatron/launch/slurm.sbatch).
``restarts`` lists every automatic restart of the run (train/restarts.py): it survives the trainer's rewrites
and a requeue, so the file is the run's whole failure history.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lucid_megatron import atomic

STATES = ("running", "preempted", "stopped", "finished", "failed")


def write_status(run_dir: Path, state: str, step: int, *, reason: str | None = None,
                 restart: dict | None = None) -> None:
    """Replace the status atomically (a job script never reads half a file), keeping the restart history and
    appending ``restart`` to it.  One process writes at a time: rank 0 while a run trains, the supervisor between."""
    if state not in STATES:
        raise ValueError(f"run state {state!r}: expected one of {', '.join(STATES)}")
    previous = read_status(run_dir) or {}
    restarts = list(previous.get("restarts", [])) + ([restart] if restart is not None else [])
    record = {"state": state, "step": step, "time": time.time(), "restarts": restarts}
    if reason is not None:
        record["reason"] = reason
    atomic.write_text(Path(run_dir) / "status.json", json.dumps(record, indent=1))


def read_status(run_dir: Path) -> dict | None:
    """The last status written, or None before the first (or when it does not parse)."""
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
