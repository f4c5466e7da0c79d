"""The ``lucid`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
registering a new one is one line in ``SUBCOMMANDS``. Options take their types from cli_args.py, so that
argparse refuses bad values before any work; exit codes and validation rules are in docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from lucid_megatron.cli_args import USAGE

# name -> (module, one-line help).  Modules are imported only when their command runs.
SUBCOMMANDS = {
    "train": ("lucid_megatron.train.cli", "train a LUCID model (DeepSpeed ZeRO over Megatron-Core)"),
    "convert": ("lucid_megatron.convert.cli", "Megatron <-> Hugging Face conversion and logit-parity check"),
    "eval": ("lucid_megatron.eval.cli", "long-context evaluation: needle retrieval, loss by position; a run's scalars as a picture"),
    "experiment": ("lucid_megatron.experiment.cli", "LUCID vs softmax reproduction, the context-extension recipe, the attention-sink toy"),
    "launch": ("lucid_megatron.launch.cli", "start training: torchrun on this machine, or a SLURM job"),
    "demo": ("lucid_megatron.demo", "check and time the LUCID operator on a small CPU problem"),
    "selftest": ("lucid_megatron.selftest.cli", "acceptance run of the GPU path (or --cpu-smoke of its code paths)"),
    "data": ("lucid_megatron.data.cli", "write token shards: synthetic retrieval data or prepared text"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command``, only that subcommand's module is imported for its arguments (the others
    are listed by name and help), so that ``lucid train --help`` does not import torch through ``convert``."""
    from lucid_megatron import __version__

    parser = argparse.ArgumentParser(prog="lucid", description="Pretraining with LUCID attention.")
    parser.add_argument("--version", action="version", version=f"lucid_megatron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(sub_parser)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (the first word; ``lucid`` itself takes no option with a value)."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


# Megatron-Core announces on every import, in every process, that it falls back from Apex and
# Transformer Engine to plain PyTorch. That is expected here (and on CPU); keep the console readable.
QUIET_WARNINGS = (
    r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*",
    r"full scope is deprecated.*",  # megatron-core's own default for cuda_graph_scope
)

# Commands that send every library warning to a log file of their own (lucid_megatron/runtime/console.py:
# train writes RUN_DIR/logs/); the others drop the expected ones above.
LOGS_LIBRARY_OUTPUT = {"train"}
# Commands that load checkpoints through DeepSpeed: name its accelerator for it (left to guess, it warns that
# it settled on the CPU); train does this itself, before routing the libraries' output.
LOADS_DEEPSPEED = {"convert", "eval", "experiment"}


def main(argv: list[str] | None = None) -> int:
    """Run ``lucid ARGV``; returns the exit code: 0, 1 for a failure at run time, 2 for bad usage or input
    (argparse's own errors included: every subcommand's options are validated by their types, cli_args.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    if command not in LOGS_LIBRARY_OUTPUT:
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    try:
        args = build_parser(command).parse_args(argv)
    except SystemExit as stop:  # --help, --version (0), or a bad argument, already reported (2)
        return stop.code if isinstance(stop.code, int) else USAGE
    if command in LOADS_DEEPSPEED:
        from lucid_megatron.runtime.process import choose_deepspeed_accelerator

        choose_deepspeed_accelerator()
    args._argv = argv  # for commands that re-launch themselves
    result = importlib.import_module(args._module).run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
