"""``lucid train CONFIG [--set section.key=value ...] [--run-dir DIR] [--resume auto|PATH] [--nproc-per-node N]
[--allow-change FIELD ...]``.

Under torchrun (``WORLD_SIZE`` set) every process trains.  Otherwise the command validates the config
for the requested number of processes, then trains in-process (N = 1) or starts torchrun for N
processes on this machine, forwarding SIGTERM/SIGUSR1 to the workers so they save and exit cleanly.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lucid_megatron.config.schema import ConfigError

if TYPE_CHECKING:  # a type only: validate imports torch, which `lucid train --help` needs not
    from lucid_megatron.train.validate import ResumePlan


def add_arguments(parser) -> None:
    from lucid_megatron import cli_args

    parser.add_argument("config", type=cli_args.input_file(),
                        help="YAML config (a path, or a name in configs/ such as 'demo')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.steps=20")
    parser.add_argument("--run-dir", type=cli_args.output_dir(),
                        help="where the run writes everything (default: runs/<config name>)")
    parser.add_argument("--resume", type=cli_args.input_dir(word="auto"),
                        help="'auto' (latest complete checkpoint in the run dir, if any) or a checkpoint path")
    parser.add_argument("--nproc-per-node", type=cli_args.positive_int(cli_args.MAX_PROCESSES),
                        help="processes to start on this machine (default: launch.nproc_per_node)")
    parser.add_argument("--profile-steps", metavar="A-B",
                        help="write a profiler trace of steps A to B per rank to RUN_DIR/profile/ "
                             "(the same as --set train.profile_steps=A-B)")
    parser.add_argument("--allow-change", nargs="+", default=[], metavar="FIELD",
                        help="fields a resume may change (the LR schedule, data.path, data.sources)")


def default_run_dir(config: str) -> Path:
    return Path("runs") / Path(config).stem


def _fail(message: str) -> int:
    print(f"lucid train: error: {message}", file=sys.stderr)
    return 2


def preflight(cfg, run_dir: Path, resume: str | None, world_size: int,
              allow_change: Sequence[str] = ()) -> ResumePlan:
    """Everything that can be checked before a process group exists (raises ConfigError); returns what the
    resume changes (the trainer says it, once, on the checkpoint it actually resumes)."""
    from lucid_megatron.train.validate import check_dataset, check_resume, check_same_model, open_dataset, split_world
    from lucid_megatron.checkpoint import Checkpointer, resolve_checkpoint
    from lucid_megatron.train.run_lock import RunDirBusy, check_free

    import torch

    from lucid_megatron.config.train import BF16_NEEDS_ZERO
    from lucid_megatron.runtime.device import check_spec, default_device, params_dtype
    from lucid_megatron.train.wandb_logger import check_wandb_available

    check_wandb_available(cfg)
    layout = split_world(cfg, world_size)
    check_spec(cfg.model.spec)
    if params_dtype(cfg.train.precision, default_device()) == torch.bfloat16 and cfg.train.zero_stage == 0:
        raise ConfigError(f"train.{BF16_NEEDS_ZERO} (train.precision={cfg.train.precision} means bf16 here)")
    dataset = None  # a synthetic dataset not written yet: the trainer writes it, then checks it
    if cfg.data.sources or (Path(cfg.data.path) / "manifest.json").exists():
        dataset = open_dataset(cfg)  # a mixture: every source present, one tokenizer
        check_dataset(cfg, dataset, layout)
    elif cfg.data.synth is None:
        raise ConfigError(
            f"data.path: {cfg.data.path!r} has no manifest.json and data.synth is not set; make a dataset with "
            f"`lucid data synth {cfg.data.path}` or `lucid data prepare FILES --out {cfg.data.path}`"
        )
    if cfg.checkpoint.init_from:
        try:
            source = resolve_checkpoint(cfg.checkpoint.init_from)
        except FileNotFoundError as err:
            raise ConfigError(f"checkpoint.init_from: {err}") from None
        check_same_model(cfg.model, source, what="checkpoint.init_from")
    if resume not in (None, "auto") and not (Path(resume) / "COMPLETE").exists():
        raise ConfigError(f"--resume: {resume!r} is not a complete checkpoint directory")
    plan = check_resume(cfg, _checkpoint_to_resume(run_dir, resume), dataset, allow_change)
    try:
        check_free(run_dir)
    except RunDirBusy as err:
        raise ConfigError(f"--run-dir: {err}") from None
    if resume is None and Checkpointer(run_dir / "checkpoints").latest() is not None:
        raise ConfigError(
            f"--run-dir: {run_dir} already has checkpoints; pass --resume auto to continue that run, "
            "or choose another --run-dir"
        )
    return plan


def _checkpoint_to_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint the trainer will resume, as far as its records tell: ``--resume PATH``, or with ``auto``
    the newest complete one whose state.json reads (the trainer skips damaged ones, and says why; one whose
    records do not read is left to it)."""
    from lucid_megatron.checkpoint import Checkpointer, read_state

    if resume is None:
        return None
    candidates = [Path(resume)] if resume != "auto" else Checkpointer(run_dir / "checkpoints").complete_checkpoints()
    for path in reversed(candidates):
        try:
            read_state(path)
        except (OSError, ValueError):
            continue
        return path
    return None


def _prepare_process(run_dir: Path, under_torchrun: bool, nproc: int, checks_first: bool) -> None:
    """Threads, DeepSpeed's accelerator, and library output to RUN_DIR/logs/ (before Megatron or DeepSpeed
    is imported): rank_K.log per training process, launcher.log for the process that starts torchrun.
    ``checks_first``: hold that output until the preflight passes (a refused run writes no run directory)."""
    from lucid_megatron.runtime.process import prepare_training_process

    if under_torchrun:
        name, local = f"rank_{int(os.environ['RANK'])}", int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
    else:
        name, local = ("rank_0" if nproc == 1 else "launcher"), nproc
    prepare_training_process(run_dir / "logs" / f"{name}.log", local_processes=local, hold_log=checks_first)


def run(args) -> int:
    from lucid_megatron.config.train import load_train_config

    if args.profile_steps is not None:  # an override, so that torchrun's workers get it with the others
        args.overrides = [*args.overrides, f"train.profile_steps={json.dumps(args.profile_steps)}"]
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail(f"invalid config: {err}")
    run_dir = Path(args.run_dir or default_run_dir(args.config))
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if under_torchrun:  # a worker dies with its torchrun, however torchrun dies (runtime/lifetime.py)
        from lucid_megatron.runtime.lifetime import die_with_parent, exit_if_orphaned

        parent = os.getppid()
        die_with_parent()
        exit_if_orphaned(parent)
    nproc = cfg.launch.nproc_per_node if args.nproc_per_node is None else args.nproc_per_node
    if nproc < 1:
        return _fail(f"--nproc-per-node: must be >= 1, got {nproc}")
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else nproc
    checks_first = not under_torchrun or os.environ.get("RANK") == "0"
    try:
        _prepare_process(run_dir, under_torchrun, nproc, checks_first)
    except ValueError as err:
        return _fail(str(err))
    if checks_first:
        try:
            preflight(cfg, run_dir, args.resume, world_size, args.allow_change)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            return _fail(str(err))
        from lucid_megatron.runtime.console import release_log_file

        release_log_file()

    if under_torchrun or nproc == 1:
        from lucid_megatron.runtime import CollectiveTimeout
        from lucid_megatron.train.run_lock import RunDirBusy
        from lucid_megatron.train.final_eval import run_final_eval
        from lucid_megatron.train.signals import PreemptionFlag
        from lucid_megatron.train.trainer import TrainingStopped, run_training

        try:
            with PreemptionFlag() as preemption:  # one flag for training and final_eval (see signals.py)
                # 0: trained (or preempted and saved); then the evaluation, if the run finished
                return (run_training(cfg, run_dir, args.resume, preemption, args.allow_change)
                        or run_final_eval(cfg, run_dir, preemption))
        except (TrainingStopped, RunDirBusy, CollectiveTimeout) as err:
            print(f"lucid train: stopped: {err}", file=sys.stderr, flush=True)
            return 1

    from lucid_megatron.train.restarts import RestartPolicy, supervise
    from lucid_megatron.runtime.commands import train_command
    from lucid_megatron.runtime.torchrun import run_torchrun

    def attempt(restarted: bool) -> int:
        # A restart resumes the newest checkpoint of this run (the first attempt's --resume PATH, until there is one).
        resume = "auto" if restarted and _checkpoint_to_resume(run_dir, "auto") else args.resume
        command = train_command(args.config, run_dir, overrides=args.overrides, resume=resume,
                                allow_change=args.allow_change)
        return run_torchrun(nproc, command, stop_grace_s=cfg.launch.stop_grace_s)

    return supervise(run_dir, attempt, RestartPolicy.of(cfg.launch),
                     say=lambda text: print(text, file=sys.stderr, flush=True))
