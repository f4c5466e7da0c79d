"""``lucid train CONFIG [--set section.key=value ...] [--run-dir DIR] [--resume auto|PATH] [--nproc-per-node N]``.

Under torchrun (``WORLD_SIZE`` set) every process trains.  Otherwise the command validates the config
for the requested number of processes, then trains in-process (N = 1) or starts torchrun for N
processes on this machine, forwarding SIGTERM/SIGUSR1 to the workers so they save and exit cleanly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lucid_megatron.config.schema import ConfigError


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML config (a path, or a name in configs/ such as 'demo')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable), e.g. --set train.steps=20")
    parser.add_argument("--run-dir", help="where the run writes everything (default: runs/<config name>)")
    parser.add_argument("--resume", help="'auto' (latest complete checkpoint in the run dir, if any) or a checkpoint path")
    parser.add_argument("--nproc-per-node", type=int, help="processes to start on this machine (default: launch.nproc_per_node)")


def default_run_dir(config: str) -> Path:
    return Path("runs") / Path(config).stem


def _fail(message: str) -> int:
    print(f"lucid train: error: {message}", file=sys.stderr)
    return 2


def preflight(cfg, run_dir: Path, resume: str | None, world_size: int) -> None:
    """Everything that can be checked before a process group exists (raises ConfigError)."""
    from lucid_megatron.train.schedule import check_layout
    from lucid_megatron.data import loader as data_loader
    from lucid_megatron.data.shards import read_manifest
    from lucid_megatron.train.checkpoint import Checkpointer

    from lucid_megatron.runtime.parallelize import check_spec

    layout = check_layout(cfg, world_size)
    check_spec(cfg.model.spec)
    manifest_path = Path(cfg.data.path) / "manifest.json"
    if manifest_path.exists():
        manifest = read_manifest(cfg.data.path)
        try:
            data_loader.check_layout(manifest, cfg.data.num_streams, layout.data_parallel, cfg.data.num_workers,
                                     cfg.train.global_batch_size)
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None
        if manifest.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset tokenizer's "
                f"{manifest.tokenizer['vocab_size']} tokens ({manifest_path})"
            )
    elif cfg.data.synth is None:
        raise ConfigError(
            f"data.path: {cfg.data.path!r} has no manifest.json and data.synth is not set; make a dataset with "
            f"`lucid data synth {cfg.data.path}` or `lucid data prepare FILES --out {cfg.data.path}`"
        )
    if cfg.checkpoint.init_from and not Path(cfg.checkpoint.init_from).exists():
        raise ConfigError(f"checkpoint.init_from: {cfg.checkpoint.init_from!r} does not exist")
    if resume not in (None, "auto") and not (Path(resume) / "COMPLETE").exists():
        raise ConfigError(f"--resume: {resume!r} is not a complete checkpoint directory")
    if resume is None and Checkpointer(run_dir / "checkpoints").latest() is not None:
        raise ConfigError(
            f"--run-dir: {run_dir} already has checkpoints; pass --resume auto to continue that run, "
            "or choose another --run-dir"
        )


def run(args) -> int:
    from lucid_megatron.config.train import load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail(f"invalid config: {err}")
    run_dir = Path(args.run_dir or default_run_dir(args.config))
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    nproc = args.nproc_per_node or cfg.launch.nproc_per_node
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else nproc
    if not under_torchrun or os.environ.get("RANK") == "0":
        try:
            preflight(cfg, run_dir, args.resume, world_size)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            return _fail(str(err))

    if under_torchrun or nproc == 1:
        from lucid_megatron.train.trainer import TrainingStopped, run_training

        try:
            return run_training(cfg, run_dir, args.resume)
        except TrainingStopped as err:
            print(f"lucid train: stopped: {err}", file=sys.stderr, flush=True)
            return 1

    from lucid_megatron.launch.local import run_torchrun, train_arguments

    return run_torchrun(nproc, train_arguments(args.config, run_dir, args.overrides, args.resume))
