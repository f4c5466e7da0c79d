"""Argument types and exit codes shared by every ``lucid`` subcommand.

Each type is what argparse calls with an option's text (``type=``): it returns the value or raises
``argparse.ArgumentTypeError``, which argparse reports before any work starts, with exit code 2::

    lucid eval niah: error: argument --num-samples: 0 is not allowed; allowed: 1 <= n <= 1000000

Every type carries ``cli_kind`` ("number" or "path"), so tests/test_cli_fuzz.py finds each numeric and path
option of every subcommand from the parsers alone. Path types check only what is certain at parse time (an
input that exists but is a FIFO, a device or the wrong kind of entry); a missing input is left to the command,
which may resolve names (``lucid train demo``), and outputs are checked at the start of ``run``
(``atomic.check_output_file`` / ``check_output_dir``).

Exit codes, the same in every subcommand: ``USAGE`` (2) for bad usage or input, found before the work
starts or when the input is read; ``FAILURE`` (1) for a failure while running. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from lucid_megatron import atomic

USAGE = 2  # bad usage or input (argparse's own code for its errors)
FAILURE = 1  # the work itself failed

# Errors of bad input: a value, a path that is missing or of the wrong kind, an output that exists.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                    PermissionError)

MAX_TOKENS = 1 << 24  # longest sequence or document any command accepts (the memory check refuses sooner)
MAX_BATCH = 4096  # sequences per forward pass
MAX_PROCESSES = 1024  # processes on one machine, or tensor/context-parallel sizes
MAX_COUNT = 10**9  # documents, rows, steps: far beyond any real run, short of an overflow
SEED_LIMIT = 1 << 32  # numpy's seed range


def _mark(kind: str, check, description: str):
    """``check`` as an argparse type of ``kind``; argparse names it by ``description`` in its own messages."""
    check.cli_kind = kind
    check.__name__ = description
    return check


def _refuse(text: str, allowed: str):
    raise argparse.ArgumentTypeError(f"{text} is not allowed; allowed: {allowed}")


# ------------------------------------------------------------------------------------------ numbers


def int_in(low: int, high: int):
    """An integer in [low, high]."""
    allowed = f"{low} <= n <= {high}"

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _refuse(repr(text), f"an integer, {allowed}")
        if not low <= value <= high:
            _refuse(str(value), allowed)
        return value

    check.low, check.high = low, high
    return _mark("number", check, "integer")


def positive_int(high: int):
    """An integer in [1, high]."""
    return int_in(1, high)


def nonnegative_int(high: int):
    """An integer in [0, high]."""
    return int_in(0, high)


def seed():
    """A random seed: an integer in [0, 2**32)."""
    return int_in(0, SEED_LIMIT - 1)


def float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """A finite number between ``low`` and ``high``; ``low_open`` / ``high_open`` leave that end out."""
    allowed = f"{low:g} {'<' if low_open else '<='} x {'<' if high_open else '<='} {high:g}"

    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _refuse(repr(text), f"a number, {allowed}")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            _refuse(text, allowed)
        return value

    check.low, check.high = low, high
    return _mark("number", check, "number")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_size(low: int, high: int):
    """A size in bytes such as ``5GB``, ``500MiB`` or ``1000000``, in [low, high]; returns the bytes."""
    allowed = f"{low} <= bytes <= {high} (e.g. 500MB, 5GB, 2GiB)"

    def check(text: str) -> int:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        unit = match.group(2).lower() if match else None
        if unit not in _SIZE_UNITS:
            _refuse(repr(text), allowed)
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
        if not low <= value <= high:
            _refuse(repr(text), allowed)
        return value

    check.low, check.high = low, high
    return _mark("number", check, "size")


# ------------------------------------------------------------------------------------------ paths


def _path_type(role: str, wanted: tuple[str, ...], expected: str, *, word: str | None = None):
    """A path that, when it exists, is one of ``wanted`` (entry kinds); ``word`` is a non-path value allowed."""

    def check(text: str) -> str:
        if not text:
            _refuse("an empty path", expected)
        if text == word:
            return text
        kind = atomic.entry_kind(text)
        if kind is not None and kind not in wanted:
            raise argparse.ArgumentTypeError(f"{text!r} is {kind}; expected {expected}")
        return text

    check.role = role
    return _mark("path", check, "path")


def input_file():
    """An input file to read (a config, a sweep, an experiment file); it may also be a name the command resolves."""
    return _path_type("input", ("a regular file",), "a regular file")


def input_dir(*, word: str | None = None):
    """An input directory (a checkpoint, a dataset, a model); ``word`` is a name allowed instead (e.g. 'byte')."""
    expected = "a directory" + (f" or {word!r}" if word else "")
    return _path_type("input", ("a directory",), expected, word=word)


def input_path():
    """An input file, directory or glob."""
    return _path_type("input", ("a regular file", "a directory"), "a regular file or a directory")


def output_file():
    """A file the command writes (checked again by ``atomic.check_output_file`` when the command starts)."""
    return _path_type("output", ("a regular file",), "a regular file (or a path that does not exist yet)")


def output_dir():
    """A directory the command writes (checked again by ``atomic.check_output_dir`` when the command starts)."""
    return _path_type("output", ("a directory",), "a directory (or a path that does not exist yet)")


def check_resumable_dir(path, option: str) -> str:
    """An output directory a rerun continues in (earlier results kept): absent, or a directory. Anything else
    raises ``atomic.OutputPathError`` naming ``option`` and what is there."""
    kind = atomic.entry_kind(str(path))
    if kind not in (None, "a directory"):
        raise atomic.OutputPathError(f"{option} {str(path)!r} is {kind}; it must be a directory (a rerun continues "
                                     "in it) or a new path")
    return path


# ------------------------------------------------------------------------------------------ exit codes


def fail(command: str, message: str, code: int = USAGE) -> int:
    """Print ``lucid COMMAND: error: MESSAGE`` (one line) and return ``code``."""
    print(f"lucid {command}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def exit_code(err: BaseException) -> int:
    """USAGE for an error of bad input, FAILURE for anything else."""
    return USAGE if isinstance(err, BAD_INPUT_ERRORS) else FAILURE


def fail_with(command: str, err: BaseException) -> int:
    """Report ``err`` in one line with the exit code its kind calls for."""
    return fail(command, str(err) or type(err).__name__, exit_code(err))
