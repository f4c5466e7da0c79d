"""``lucid launch slurm|status|cancel`` (one machine: ``lucid train --nproc-per-node N``).

    lucid launch slurm --nodes N --gpus-per-node G [--partition P --account A --time T --qos Q ...]
                       CONFIG [--set k=v ...] [--sweep FILE] [--dry-run]
    lucid launch status JOBID
    lucid launch cancel JOBID [--signal SIG]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lucid_megatron import cli_args
from lucid_megatron.config.schema import ConfigError

MAX_NODES = 100_000
MAX_GPUS_PER_NODE = 64
MAX_CPUS_PER_TASK = 4096
MAX_SIGNAL_SECONDS = 65535  # SLURM's limit for --signal=SIG@TIME
MAX_REQUEUE = 1000


def _common(parser) -> None:
    parser.add_argument("config", type=cli_args.input_file(), help="training config (path, or a name in configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--run-dir", type=cli_args.output_dir(), help="default: runs/<config name>")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="launch_command", metavar="{slurm,status,cancel}", required=True)

    slurm = sub.add_parser("slurm", help="render an sbatch script, submit it, print the job id and log paths")
    slurm.add_argument("--nodes", type=cli_args.positive_int(MAX_NODES), default=1)
    slurm.add_argument("--gpus-per-node", type=cli_args.nonnegative_int(MAX_GPUS_PER_NODE), default=0,
                       help="0 for CPU nodes")
    slurm.add_argument("--nproc-per-node", type=cli_args.positive_int(cli_args.MAX_PROCESSES),
                       help="training processes per node (default: --gpus-per-node, or the config's launch.nproc_per_node)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--time", help="SLURM time limit: MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, "
                                      "DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS, e.g. 02:00:00")
    slurm.add_argument("--cpus-per-task", type=cli_args.positive_int(MAX_CPUS_PER_TASK))
    slurm.add_argument("--signal-seconds", type=cli_args.positive_int(MAX_SIGNAL_SECONDS), default=120,
                       help="SIGUSR1 this many seconds before the time limit: checkpoint and requeue")
    slurm.add_argument("--max-requeue", type=cli_args.nonnegative_int(MAX_REQUEUE), default=3)
    slurm.add_argument("--job-name")
    slurm.add_argument("--sweep", type=cli_args.input_file(),
                       help="YAML list of override lists: one job-array task each")
    slurm.add_argument("--sbatch-arg", dest="sbatch_args", action="append", default=[],
                       help="extra '#SBATCH' line, e.g. --sbatch-arg=--exclusive (repeatable)")
    slurm.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    _common(slurm)

    status = sub.add_parser("status", help="state of a job (squeue --states=all, else scontrol show job)")
    status.add_argument("job_id")
    cancel = sub.add_parser("cancel", help="scancel a job (or send it a signal)")
    cancel.add_argument("job_id")
    cancel.add_argument("--signal", help="e.g. USR1 to make the run checkpoint and requeue")


def _fail(message: str, code: int = cli_args.USAGE) -> int:
    return cli_args.fail("launch", message, code)


def _load_sweep(path: str) -> list[list[str]]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--sweep {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, list) or not all(
        isinstance(item, list) and all(isinstance(x, str) for x in item) for item in data
    ):
        raise ConfigError(f"--sweep {path}: expected a YAML list of lists of 'section.key=value' strings")
    return data


def _run_slurm(args) -> int:
    from lucid_megatron.config.train import load_train_config
    from lucid_megatron.train.schedule import split_world
    from lucid_megatron.launch.node_layout import check_placement
    from lucid_megatron.launch.slurm import SlurmJob, render, submit, write_script
    from lucid_megatron.train.cli import default_run_dir

    try:
        sweep = _load_sweep(args.sweep) if args.sweep else None
        base = load_train_config(args.config, args.overrides)
        nproc = args.nproc_per_node or args.gpus_per_node or base.launch.nproc_per_node
        job = SlurmJob(
            config=args.config, run_dir=Path(args.run_dir or default_run_dir(args.config)), nodes=args.nodes,
            gpus_per_node=args.gpus_per_node, nproc_per_node=nproc, overrides=args.overrides, sweep=sweep,
            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
            cpus_per_task=args.cpus_per_task, signal_seconds=args.signal_seconds, max_requeue=args.max_requeue,
            job_name=args.job_name, sbatch_args=args.sbatch_args,
        )
        job.validate()
        # Every task's config must be valid for this world size, and its head all-to-all placed inside a
        # node where it must be, before anything is submitted.
        warnings = []
        for extra in sweep or [[]]:
            cfg = load_train_config(args.config, args.overrides + extra)
            split_world(cfg, job.world_size)
            warnings += [w for w in check_placement(cfg, job.nodes, job.nproc_per_node) if w not in warnings]
        script = render(job)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    for warning in warnings:
        print(f"lucid launch: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(script, end="")
        return 0
    try:
        path = write_script(job)
    except OSError as err:
        return cli_args.fail_with("launch", err)
    try:
        job_id = submit(path)
    except (RuntimeError, FileNotFoundError) as err:  # sbatch refused the job, or there is no sbatch here
        return _fail(f"{err} (script kept at {path})", cli_args.FAILURE)
    stem = f"lucid-{Path(args.config).stem}" if not args.job_name else args.job_name
    logs = job.log_dir.resolve()
    print(f"submitted job {job_id}: {job.nodes} node(s) x {nproc} process(es)")
    print(f"  script: {path.resolve()}")
    print(f"  logs:   {logs}/{stem}-{job_id}.out and {logs}/{stem}-{job_id}-node<N>.log"
          if sweep is None else f"  logs:   {logs}/{stem}-{job_id}_<task>.out (+ -node<N>.log per task)")
    print(f"  status: lucid launch status {job_id}    cancel: lucid launch cancel {job_id}")
    return 0


def _slurm_tool(command: list[str], **options) -> subprocess.CompletedProcess:
    """Run a SLURM client; its absence is one line (FileNotFoundError naming it), not a traceback."""
    try:
        return subprocess.run(command, **options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{command[0]} not found: run this on a machine with the SLURM client tools") from None


def _status(args) -> int:
    result = _slurm_tool(["squeue", "--states=all", "-j", args.job_id, "-o", "%.12i %.10T %.10M %.12l %.6D %R"],
                            capture_output=True, text=True)
    if result.returncode == 0 and len(result.stdout.strip().splitlines()) > 1:
        print(result.stdout, end="")
        return 0
    result = _slurm_tool(["scontrol", "show", "job", args.job_id], capture_output=True, text=True)
    print(result.stdout or result.stderr, end="")
    return result.returncode


def _cancel(args) -> int:
    command = ["scancel"] + ([f"--signal={args.signal}"] if args.signal else []) + [args.job_id]
    return _slurm_tool(command).returncode


def run(args) -> int:
    try:
        return {"slurm": _run_slurm, "status": _status, "cancel": _cancel}[args.launch_command](args)
    except FileNotFoundError as err:  # a SLURM client missing: the machine, not the arguments
        return _fail(str(err), cli_args.FAILURE)
