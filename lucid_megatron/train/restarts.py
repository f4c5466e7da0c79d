"""Restart a training job from its newest checkpoint after a failure that is not a preemption.

The supervisor runs one *attempt* (torchrun on this machine, or one ``srun`` job step of torchrun per node in a
SLURM allocation), and when it fails, reads what happened and decides:

* the trainer finished, was stopped, or saved on a preemption signal (status.json, written during this
  attempt): done; the job script requeues a preemption as before;
* the trainer itself declared the run failed (non-finite weights, a checkpoint it could not write): done, no
  restart (a restart would meet the same);
* anything else (a worker killed or crashed, a hang the watchdog ended, a lost peer): restart with
  ``--resume auto`` after a back-off, at most ``launch.max_restarts`` times per launch, unless the same step
  failed ``launch.max_same_step_failures`` times in a row, which is deterministic: stop, naming step and rank.

Restarts happen inside the allocation (a new job step), not through torchrun's ``--max-restarts``: that would
restart without telling the step, the rank or the cause, with no back-off, and could not stop a deterministic
crash.  A node that dies takes the allocation with it; SLURM then requeues the job (``--requeue``) and the
requeued job's supervisor continues the same history.  Each restart is a record in status.json's ``restarts``
(cause, step, rank, host, phase, time lost) and a line on the console.

Run by ``lucid train`` for its torchrun, and by the SLURM script as
``python -m lucid_megatron.train.restarts --run-dir DIR CONFIG [--set k=v ...] -- srun ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lucid_megatron.runtime.elastic_agent import FAILURE_RECORDS

from .progress import HANG_EXIT_CODE, read_progress
from .status import read_status, write_status

DONE_STATES = ("finished", "stopped", "preempted", "failed")
REFUSED_EXIT_CODE = 2  # `lucid train`'s exit code for a config or resume its checks refuse


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3
    max_same_step_failures: int = 2
    backoff_s: float = 10.0

    @classmethod
    def of(cls, launch) -> "RestartPolicy":
        """From a config's ``launch`` section."""
        return cls(launch.max_restarts, launch.max_same_step_failures, launch.restart_backoff_s)

    def backoff(self, restart: int) -> float:
        """Seconds before restart number ``restart`` (1, 2, ...): doubling, at most 8x the first."""
        return self.backoff_s * min(2 ** (restart - 1), 8)


@dataclasses.dataclass
class Failure:
    """One failed attempt, as status.json records it."""

    exit_code: int
    cause: str
    step: int | None = None
    rank: int | None = None
    host: str | None = None
    phase: str | None = None
    worker_exit_code: int | None = None  # the failed worker's (torchrun's own is 1)
    time: float = dataclasses.field(default_factory=time.time)
    time_lost_s: float = 0.0  # training since the checkpoint the restart resumes (done again)
    resumes_from: int | None = None  # the step of that checkpoint (None: from the start)

    def where(self) -> str:
        rank = f"rank {self.rank}" + (f" (host {self.host})" if self.host else "") if self.rank is not None \
            else "an unknown rank"
        return f"{rank} at step {self.step if self.step is not None else '?'}" + \
            (f" in phase '{self.phase}'" if self.phase else "")


def _records_since(run_dir: Path, started: float) -> list[dict]:
    """The elastic agents' failure records of this attempt (runtime/elastic_agent.py)."""
    import json

    found = []
    for path in sorted((Path(run_dir) / "failures").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("time", 0) >= started:
            found += [dict(f, host=record.get("host")) for f in record.get("failures", [])]
    return found


def _describe_exit(entry: dict) -> str:
    if entry.get("signal"):
        return f"killed by {entry['signal']}"
    if entry.get("exit_code") == HANG_EXIT_CODE:
        return "stopped by the hang watchdog"
    return f"exit code {entry.get('exit_code')}"


def _latest_checkpoint(run_dir: Path) -> tuple[int, float] | None:
    """(step, time it was published) of the checkpoint ``--resume auto`` starts from, or None (no checkpoint)."""
    from lucid_megatron.checkpoint import Checkpointer, read_state  # Megatron's import: only after a failure

    latest = Checkpointer(Path(run_dir) / "checkpoints").latest()
    if latest is None:
        return None
    try:
        return int(read_state(latest)["step"]), (latest / "COMPLETE").stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_failure(run_dir: Path, started: float, exit_code: int) -> Failure:
    """What failed in the attempt that began at ``started`` (time.time()) and ended with ``exit_code``.

    The rank, in this order: one killed by a signal other than torchrun's SIGTERM (a kill, a crash in native
    code), one whose progress record says why it stopped other than losing a peer (its Python error, or the
    hang watchdog), the one torchrun saw fail first; the step is that rank's, else the furthest any rank got.
    """
    now = time.time()
    progress = {r: p for r, p in read_progress(run_dir).items() if p.get("time", 0) >= started}
    by_rank = {entry["rank"]: entry for entry in _records_since(run_dir, started)}
    errors = {r: p["error"] for r, p in progress.items() if p.get("error")}
    own_errors = {r: e for r, e in errors.items() if "CollectiveTimeout" not in e}
    signalled = [r for r, e in by_rank.items() if e.get("signal") not in (None, "SIGTERM")]
    exited_on_error = [r for r in own_errors if by_rank.get(r, {}).get("signal") is None]
    if signalled:
        rank = min(signalled)
    elif exited_on_error or own_errors:
        rank = min(exited_on_error or own_errors)
    elif by_rank:
        rank = min(by_rank, key=lambda r: (by_rank[r].get("time") or 0, r))
    else:
        rank = min(errors, default=None)
    if rank is None:
        cause = f"the job step ended with exit code {exit_code} and no worker left a record"
    else:
        said = [errors[rank]] if rank in errors else []
        if rank in by_rank and not (said and by_rank[rank].get("signal") == "SIGTERM"):
            said.append(_describe_exit(by_rank[rank]))  # torchrun's SIGTERM after the error says nothing more
        said += [f"rank {r}: {e}" for r, e in sorted(own_errors.items()) if r != rank and e != errors.get(rank)][:1]
        cause = "; ".join(said) or "no record of why"
    record = progress.get(rank, {}) if rank is not None else {}
    steps = [p.get("step") for p in progress.values() if p.get("step") is not None]
    step = record.get("step") if record.get("step") is not None else (max(steps) if steps else None)
    checkpoint = _latest_checkpoint(run_dir)
    since = max(started, checkpoint[1]) if checkpoint else started
    return Failure(exit_code=exit_code, cause=cause, step=step, rank=rank,
                   host=record.get("host") or by_rank.get(rank, {}).get("host"), phase=record.get("phase"),
                   worker_exit_code=by_rank.get(rank, {}).get("exit_code"), time=now,
                   time_lost_s=round(max(now - since, 0.0), 3), resumes_from=checkpoint[0] if checkpoint else None)


def same_step_failures(history: list[dict], failure: Failure) -> int:
    """How many failures in a row, this one included, happened at ``failure``'s step."""
    count = 1
    for previous in reversed(history):
        if failure.step is None or previous.get("step") != failure.step:
            break
        count += 1
    return count


class _StopRequests:
    """SIGTERM/SIGINT/SIGUSR1 while supervising: no further restart (an attempt running forwards them itself)."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def supervise(run_dir: Path, run_attempt: Callable[[bool], int], policy: RestartPolicy,
              say: Callable[[str], None] = print) -> int:
    """Run attempts until one ends the run (see the module's docstring); return the exit code for the job.

    ``run_attempt(restarted)`` starts one attempt and returns its exit code (``restarted``: resume the newest
    checkpoint).  Stop signals received while an attempt runs are the attempt's to handle (it forwards them);
    any received at all means no restart afterwards.
    """
    run_dir = Path(run_dir)
    os.environ[FAILURE_RECORDS] = str(run_dir / "failures")
    restarts = 0
    with _StopRequests() as stop:
        while True:
            started = time.time()
            exit_code = run_attempt(restarts > 0)
            status = read_status(run_dir) or {}
            fresh = status.get("time", 0) >= started
            if fresh and status.get("state") in DONE_STATES:
                return exit_code if status["state"] != "preempted" else 0
            failure = read_failure(run_dir, started, exit_code)
            history = status.get("restarts", [])
            repeats = same_step_failures(history, failure)
            step = failure.step if failure.step is not None else (status.get("step") or 0)
            say(f"lucid: the job failed: {failure.where()}: {failure.cause}")
            reason = None
            if stop.received:
                reason = f"not restarting: {stop.received} received"
            elif failure.worker_exit_code == REFUSED_EXIT_CODE:
                reason = f"not restarting: {failure.where()} refused the run (its message is above)"
            elif repeats >= policy.max_same_step_failures and failure.step is not None:
                reason = (f"{failure.where()} failed {repeats} times in a row ({failure.cause}): a failure that "
                          f"repeats at the same step is deterministic; not restarting "
                          f"(launch.max_same_step_failures={policy.max_same_step_failures}). Fix the cause, then "
                          "continue with --resume auto")
            elif restarts >= policy.max_restarts:
                reason = (f"not restarting: {restarts} restart(s) already (launch.max_restarts="
                          f"{policy.max_restarts}); continue with --resume auto")
            if reason is not None:
                write_status(run_dir, "failed", step, reason=reason)
                say(f"lucid: {reason}")
                return exit_code or 1
            restarts += 1
            backoff = policy.backoff(restarts)
            record = dataclasses.asdict(failure) | {"restart": restarts, "backoff_s": backoff}
            write_status(run_dir, "running", step, restart=record)
            resume = (f"from the checkpoint of step {failure.resumes_from}" if failure.resumes_from is not None
                      else "from the start (no checkpoint yet)")
            say(f"lucid: restart {restarts}/{policy.max_restarts} in {backoff:g} s, {resume}; "
                f"{failure.time_lost_s:.1f} s of training is done again")
            deadline = time.monotonic() + backoff
            while time.monotonic() < deadline and not stop.received:
                time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
            if stop.received:
                write_status(run_dir, "failed", step, reason=f"not restarting: {stop.received} received")
                return exit_code or 1


# ---- the SLURM script's entry point --------------------------------------------------------------


def _job_step(command: list[str]) -> Callable[[bool], int]:
    """One attempt = the job step ``command`` (srun ... torchrun ...); a restart appends nothing: the command
    already resumes with --resume auto."""

    def attempt(restarted: bool) -> int:
        proc = subprocess.Popen(command)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # srun handles the signal itself; wait for it
                continue

    return attempt


def main(argv: list[str] | None = None) -> int:
    from lucid_megatron.config.schema import ConfigError
    from lucid_megatron.config.train import load_train_config

    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m lucid_megatron.train.restarts --run-dir DIR CONFIG [--set k=v ...] -- COMMAND ...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m lucid_megatron.train.restarts")
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"lucid: invalid config: {err}", file=sys.stderr)
        return 2
    say = lambda text: print(text, flush=True)  # noqa: E731
    return supervise(Path(args.run_dir), _job_step(command), RestartPolicy.of(cfg.launch), say)


if __name__ == "__main__":
    sys.exit(main())
