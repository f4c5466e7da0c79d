"""``lucid selftest gpu --out DIR [--cpu-smoke] [--budget SECONDS]``."""

from __future__ import annotations

import argparse

from lucid_megatron import cli_args

MAX_BUDGET_S = 7 * 24 * 3600.0


def add_arguments(parser) -> None:
    from lucid_megatron.selftest import gpu as selftest_gpu  # light: the parts import torch when they run

    sub = parser.add_subparsers(dest="selftest_command", metavar="{gpu}", required=True)
    names = ", ".join(part.name for part in selftest_gpu.PARTS)
    gpu = sub.add_parser("gpu", help=f"acceptance run on one GPU: {names}", description=selftest_gpu.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu.add_argument("--out", required=True, type=cli_args.output_dir(),
                     help="directory for results.json, results.md, runs and logs")
    gpu.add_argument("--cpu-smoke", action="store_true",
                     help="every code path at toy sizes on CPU (Triton under its interpreter): what CI runs")
    gpu.add_argument("--budget", type=cli_args.float_in(0, MAX_BUDGET_S, low_open=True), default=420.0,
                     help="seconds for the whole run; timings stop early")


def run(args) -> int:
    import os
    import subprocess

    from lucid_megatron.runtime.commands import process_command
    from lucid_megatron.selftest.gpu import run_selftest

    try:
        cli_args.check_resumable_dir(args.out, "--out")
    except ValueError as err:
        return cli_args.fail("selftest", str(err))
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton picks its interpreter when it is first imported (this process may have imported it
        # already, through transformers): run the smoke in a fresh process that chooses it up front.
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run(process_command(args._argv), env=env).returncode

    try:
        return run_selftest(args.out, cpu_smoke=args.cpu_smoke, budget_s=args.budget)
    except cli_args.BAD_INPUT_ERRORS as err:
        return cli_args.fail("selftest", str(err), cli_args.exit_code(err))
    except RuntimeError as err:  # no CUDA device here: the wrong machine for this command, a usage error
        return cli_args.fail("selftest", str(err), cli_args.USAGE)
