"""Render and submit the SLURM batch script of a training run (template: slurm.sbatch, next to this module).

One ``srun`` task per node runs torchrun with the c10d rendezvous on the allocation's first node; the job
asks for a warning signal before its time limit (``--signal=USR1@...``), the trainer checkpoints on it,
and the script requeues the job, which resumes with ``--resume auto`` (at most ``max_requeue`` times).
A sweep renders a job array: one override set per array task, each in its own run directory.
"""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

from lucid_megatron import atomic

TEMPLATE = Path(str(resources.files("lucid_megatron.launch") / "slurm.sbatch"))  # package data
SLURM_TIME_FORMATS = ("MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, DAYS-HOURS:MINUTES, "
                      "DAYS-HOURS:MINUTES:SECONDS")


def _time_fields(text: str) -> list[tuple[str, int]] | None:
    """(unit, value) of each field of a SLURM time limit, or None when it has none of SLURM's forms."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, *rest = match.groups()
    given = [int(value) for value in rest if value is not None]
    if days is not None:
        units = ("hours", "minutes", "seconds")
        return [("days", int(days))] + list(zip(units, given))
    units = {1: ("minutes",), 2: ("minutes", "seconds"), 3: ("hours", "minutes", "seconds")}[len(given)]
    return list(zip(units, given))


def slurm_time_problem(text: str) -> str | None:
    """Why ``text`` is not a SLURM time limit (``sbatch --time``), or None. The leading field is unbounded
    (``90`` minutes, ``48:00:00``); the fields after it are bounded by the next unit."""
    fields = _time_fields(text)
    if fields is None:
        return "not one of its forms"
    limits = {"hours": 24, "minutes": 60, "seconds": 60}
    for unit, value in fields[1:]:
        if value >= limits[unit]:
            return f"{unit} {value} must be < {limits[unit]}"
    return None


@dataclasses.dataclass
class SlurmJob:
    config: str
    run_dir: Path
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 1
    overrides: list[str] = dataclasses.field(default_factory=list)
    sweep: list[list[str]] | None = None  # one override list per array task
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    signal_seconds: int = 120
    max_requeue: int = 3
    job_name: str | None = None
    sbatch_args: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        # Every string below lands in the script (#SBATCH lines are read up to the first non-comment line):
        # a newline or other control character would end the header or inject a command.
        texts = {"--job-name": self.job_name, "--partition": self.partition, "--account": self.account,
                 "--qos": self.qos, "--time": self.time, "--run-dir": str(self.run_dir), "CONFIG": self.config}
        texts.update({f"--sbatch-arg[{i}]": arg for i, arg in enumerate(self.sbatch_args)})
        for name, text in texts.items():
            bad = next((c for c in text or "" if ord(c) < 32 or ord(c) == 127), None)
            if bad is not None:
                raise ValueError(f"{name} {text!r} contains the control character {bad!r}; not allowed in a job script")
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-"):
                raise ValueError(f"--sbatch-arg[{i}] {arg!r} must be an sbatch option such as --mem=64G")
        for name in ("nodes", "nproc_per_node", "signal_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.max_requeue < 0:
            raise ValueError(f"--gpus-per-node and --max-requeue must be >= 0, got {self.gpus_per_node}, {self.max_requeue}")
        if self.gpus_per_node and self.nproc_per_node != self.gpus_per_node:
            raise ValueError(
                f"--nproc-per-node ({self.nproc_per_node}) must equal --gpus-per-node ({self.gpus_per_node}): "
                "one training process per GPU"
            )
        if self.time is not None:
            problem = slurm_time_problem(self.time)
            if problem:
                raise ValueError(f"--time {self.time!r} is not a SLURM time: {problem}; "
                                 f"allowed: {SLURM_TIME_FORMATS}")
        if self.sweep is not None and not self.sweep:
            raise ValueError("the sweep file lists no override sets")

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "slurm"


def _bash_array(values: list[str]) -> str:
    return "(" + " ".join(shlex.quote(v) for v in values) + ")"


def _overrides_block(job: SlurmJob) -> str:
    def as_args(assignments):
        args = []
        for assignment in assignments:
            args += ["--set", assignment]
        return args

    if job.sweep is None:
        return f"OVERRIDES={_bash_array(as_args(job.overrides))}"
    lines = ['case "$SLURM_ARRAY_TASK_ID" in']
    for task, extra in enumerate(job.sweep):
        lines.append(f"  {task}) OVERRIDES={_bash_array(as_args(job.overrides + extra))} ;;")
    lines.append('  *) echo "lucid: no override set for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
    lines.append("esac")
    lines.append('RUN_DIR="$RUN_DIR/task-$SLURM_ARRAY_TASK_ID"')
    return "\n".join(lines)


def render(job: SlurmJob) -> str:
    """The batch script for ``job`` (paths made absolute, so it runs from any directory)."""
    job.validate()
    stem = "%x-%A_%a" if job.sweep is not None else "%x-%j"
    directives = {
        "job-name": job.job_name or f"lucid-{Path(job.config).stem}",
        "nodes": job.nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": job.gpus_per_node or None,
        "cpus-per-task": job.cpus_per_task,
        "partition": job.partition,
        "account": job.account,
        "qos": job.qos,
        "time": job.time,
        "signal": f"USR1@{job.signal_seconds}",  # to the job steps: the training processes save on it
        "requeue": True,
        "open-mode": "append",  # a requeued job appends to its logs
        "output": str(job.log_dir.resolve() / f"{stem}.out"),
        "array": f"0-{len(job.sweep) - 1}" if job.sweep is not None else None,
    }
    lines = []
    for key, value in directives.items():
        if value is True:
            lines.append(f"#SBATCH --{key}")
        elif value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {arg}" for arg in job.sbatch_args]
    threads = max(1, job.cpus_per_task // job.nproc_per_node) if job.cpus_per_task else 1
    return Template(TEMPLATE.read_text()).substitute(
        sbatch_directives="\n".join(lines),
        python=shlex.quote(sys.executable),
        config=shlex.quote(str(Path(job.config).resolve())),
        run_dir=shlex.quote(str(job.run_dir.resolve())),
        log_dir=shlex.quote(str(job.log_dir.resolve())),
        max_requeue=job.max_requeue,
        nproc_per_node=job.nproc_per_node,
        overrides_block=_overrides_block(job),
        omp_threads=threads,
        log_stem=stem,
    )


def write_script(job: SlurmJob) -> Path:
    """Save the rendered script next to the run's logs (so it can be resubmitted by hand)."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    path = job.log_dir / "job.sbatch"
    atomic.write_text(path, render(job))
    return path


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]
