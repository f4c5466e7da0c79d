"""torchrun, leaving a record of which worker failed and how: ``python -m lucid_megatron.runtime.elastic_agent ARGS``.

It runs ``torch.distributed.run`` with the same arguments.  When a worker fails, torchrun stops the others and
raises ``ChildFailedError`` with each failed worker's global rank, exit code (negative: the signal) and pid;
this writes them as JSON into ``$LUCID_FAILURE_RECORDS`` (one file per node agent), where the restart supervisor
(train/restarts.py) reads them, kills what those workers left behind, then exits 1 as torchrun does.  torchrun's own table goes to stderr as before.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

FAILURE_RECORDS = "LUCID_FAILURE_RECORDS"


def _signal_name(exit_code: int) -> str | None:
    if exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def write_failure_record(directory: Path, failures: dict) -> Path:
    """``failures``: global rank -> torchrun's ProcessFailure.  One JSON file per agent (host and pid)."""
    directory.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "time": time.time(), "failures": [
        {"rank": int(rank), "local_rank": f.local_rank, "exit_code": f.exitcode, "signal": _signal_name(f.exitcode),
         "pid": f.pid, "time": f.timestamp} for rank, f in failures.items()]}
    path = directory / f"{record['host']}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return path


def stop_leftovers(failures: dict) -> None:
    """Kill what a failed worker left running.  torchrun starts each worker in its own session and stops the
    process groups of the workers still alive; a worker that died first (killed, crashed, or ended by the hang
    watchdog) can leave children in its group (a checkpoint writer's multiprocessing manager) that nobody
    stops, holding memory and the job's output pipes."""
    for failure in failures.values():
        try:
            os.killpg(failure.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.main(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as err:
        stop_leftovers(err.failures)
        directory = os.environ.get(FAILURE_RECORDS)
        if directory:
            try:
                write_failure_record(Path(directory), err.failures)
            except OSError as write_error:
                print(f"lucid: could not record the failure in {directory}: {write_error}", file=sys.stderr)
        print(str(err), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
