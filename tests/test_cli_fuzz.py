"""Every numeric and path option of every ``lucid`` subcommand, found in the parsers themselves: a bad value is
a one-line error with exit code 2, a path that is missing, a directory, a FIFO or a device never leads to a
traceback or a hang, and nothing is written outside the temporary directory.

The cases come from ``lucid_megatron.cli.build_parser()``: an option added to any subcommand is tried here
without a change to this file, as long as its type comes from ``lucid_megatron.cli_args`` (a bare ``int`` or
``float`` type fails the test). What a new subcommand needs is one line in ``BASES``: an invocation that
fails fast on a missing input once its arguments pass (so that a valid value starts no real work), or one in
``WORK`` for the function where its real work starts, which the test replaces by a stop sign.

Each command runs in this process through ``lucid_megatron.cli.main`` (milliseconds a case, after the first
imports), with the working directory in the temporary directory and a timer that stops a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from lucid_megatron.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
NUMBERS = ("0", "-1", str(10**12))
PATH_KINDS = ("missing", "directory", "fifo", "device")
LIMIT_S = 5.0  # a case that takes longer is taken for a hang
FIRST_LIMIT_S = 120.0  # the base invocation, which imports the command's modules (Megatron: seconds)


@dataclasses.dataclass(frozen=True)
class Base:
    """A minimal invocation: positional values by dest, options by their first option string. ``{missing}``
    is a path that does not exist, ``{new}`` a fresh output path, both in the case's own directory."""

    positionals: dict[str, str] = dataclasses.field(default_factory=dict)
    options: dict[str, str] = dataclasses.field(default_factory=dict)


# Each base fails fast (a missing input) once its arguments pass, or reaches a WORK function; None: the
# subcommand has no numeric or path option.
BASES = {
    ("train",): Base({"config": "{missing}.yaml"}),
    ("convert", "to-hf"): Base({"checkpoint": "{missing}", "out_dir": "{new}"}),
    ("convert", "from-hf"): Base({"hf_dir": "{missing}", "checkpoint": "{new}"}),
    ("convert", "verify"): Base({"checkpoint": "{missing}", "hf_dir": "{missing}"}),
    ("eval", "niah"): Base(options={"--checkpoint": "{missing}", "--lengths": "64"}),
    ("eval", "mqar"): Base(options={"--checkpoint": "{missing}", "--pairs": "8"}),
    ("eval", "ppl"): Base(options={"--checkpoint": "{missing}", "--data": "{missing}"}),
    ("eval", "scalars"): Base({"run_dir": "{missing}"}, {"--out": "{new}"}),
    ("experiment", "repro"): Base({"experiment": "{missing}.yaml"}, {"--out": "{new}"}),
    ("experiment", "extend"): Base({"recipe": "{missing}.yaml"}, {"--out": "{new}"}),
    ("experiment", "toy"): Base(options={"--out": "{new}"}),
    ("launch", "slurm"): Base({"config": "{missing}.yaml"}, {"--dry-run": ""}),
    ("launch", "status"): None,  # no numeric or path option (and never a real squeue/scancel from a test)
    ("launch", "cancel"): None,
    ("demo",): Base(),
    ("selftest", "gpu"): Base(options={"--out": "{new}"}),
    ("data", "synth"): Base({"out_dir": "{new}"}),
    ("data", "prepare"): Base({"inputs": "{missing}.txt"}, {"--out": "{new}"}),
}
# Where real work starts, for commands whose valid invocations have no input to miss.
WORK = ("lucid_megatron.demo.lucid_attention", "lucid_megatron.experiment.toy.train_toy",
        "lucid_megatron.experiment.repro.run_experiment", "lucid_megatron.selftest.gpu.run_selftest",
        "lucid_megatron.data.synth.write_synth_dataset", "lucid_megatron.runtime.torchrun.run_torchrun")


class WorkStarted(Exception):
    """A valid invocation reached its real work (replaced by this stop sign)."""


class Hang(Exception):
    """A case ran past LIMIT_S."""


def _leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(subcommand words, parser) of every leaf subcommand."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield words, parser
        return
    for name, child in subparsers[0].choices.items():
        yield from _leaves(child, words + (name,))


def _kind(action: argparse.Action) -> str | None:
    return getattr(action.type, "cli_kind", None)


def _values(action: argparse.Action) -> tuple[str, ...]:
    return NUMBERS if _kind(action) == "number" else PATH_KINDS


def _name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


LEAVES = dict(_leaves(build_parser()))


def test_every_subcommand_has_a_base_and_typed_numbers():
    assert set(LEAVES) == set(BASES), "add a base invocation to BASES for each new subcommand"
    bare = [f"{' '.join(words)} {_name(a)}" for words, parser in LEAVES.items() for a in parser._actions
            if a.type in (int, float)]
    assert bare == [], "numeric options must take their type from lucid_megatron.cli_args (bounds, one-line errors)"


def _materials(case_dir: Path) -> dict[str, str]:
    """The paths a case may use: missing, new, an empty directory, a FIFO and (as root) a device node."""
    case_dir.mkdir()
    (case_dir / "directory").mkdir()
    os.mkfifo(case_dir / "fifo.txt")
    paths = {"missing": str(case_dir / "missing"), "new": str(case_dir / "new"),
             "directory": str(case_dir / "directory"), "fifo": str(case_dir / "fifo.txt")}
    try:
        os.mknod(case_dir / "device.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # like /dev/null
        paths["device"] = str(case_dir / "device.txt")
    except PermissionError:  # not root: no device case
        pass
    return paths


def _argv(words, parser, base: Base, paths: dict[str, str], override: tuple[argparse.Action, str] | None):
    """The base invocation with one option or positional replaced by ``override`` (action, value)."""
    positionals = dict(base.positionals)
    options = dict(base.options)
    if override is not None:
        action, value = override
        if action.option_strings:
            options[action.option_strings[0]] = value
        else:
            positionals[action.dest] = value
    argv = list(words)
    for option, value in options.items():
        argv += [option] + ([value.format(**paths)] if value else [])
    for action in parser._actions:
        if not action.option_strings and action.dest in positionals:
            argv.append(positionals[action.dest].format(**paths))
    return argv


@contextlib.contextmanager
def _time_limit(seconds: float):
    def stop(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run(argv: list[str], capsys, limit_s: float = LIMIT_S) -> tuple[object, str, float]:
    """(exit code or 'work', stderr, seconds) of ``lucid ARGV`` in this process."""
    started = time.monotonic()
    try:
        with _time_limit(limit_s):
            code = main(argv)
    except WorkStarted:
        code = "work"
    except SystemExit as stop:
        code = stop.code
    seconds = time.monotonic() - started
    return code, capsys.readouterr().err, seconds


def _repository_state() -> tuple[str, list[int]]:
    """git's view of the checkout (ignored directories listed, not walked) and the modification times of the
    directories a stray relative write would land in."""
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    directories = [REPO, REPO / "runs", REPO / "data", REPO / "configs"]
    return status, [path.stat().st_mtime_ns for path in directories if path.exists()]


def _cases(words):
    parser = LEAVES[words]
    for action in parser._actions:
        if _kind(action) in ("number", "path"):
            for value in _values(action):
                yield action, value


def _expected_refusal(action: argparse.Action, value: str) -> bool:
    """Whether argparse itself must refuse ``value`` (a number outside the type's bounds)."""
    if _kind(action) != "number" or not hasattr(action.type, "low"):
        return False
    number = float(value)
    return not action.type.low <= number <= action.type.high


def _problems_of_case(words, override, paths, capsys, limit_s: float = LIMIT_S) -> list[str]:
    """What is wrong with ``lucid WORDS`` of the base invocation with ``override`` (action, value), if anything;
    ``override`` None runs the base invocation itself."""
    action, value = override or (None, None)
    if action is not None and _kind(action) == "path":
        if value not in paths:
            return []  # no device node without root
        override = (action, paths[value])
    argv = _argv(words, LEAVES[words], BASES[words], paths, override)
    try:
        code, err, seconds = _run(argv, capsys, limit_s)
    except Hang as hang:
        return [f"lucid {' '.join(argv)}: {hang}"]
    except Exception as crash:  # what a user would see as a traceback
        return [f"lucid {' '.join(argv)}: raised {type(crash).__name__}: {crash}"]
    where = f"lucid {' '.join(argv)} (exit {code}, {seconds:.1f} s)"
    problems = []
    if "Traceback" in err:
        problems.append(f"{where}: a traceback on stderr: {err[-500:]}")
    if code not in (0, 1, 2, "work"):
        problems.append(f"{where}: exit code {code!r}; allowed: 0, 1, 2")
    if code == 2 and "error: " not in err:
        problems.append(f"{where}: exit 2 without an error message")
    refused_by_argparse = action is not None and code == 2 and f"argument {_name(action)}" in err
    if action is not None and _expected_refusal(action, value) and not refused_by_argparse:
        problems.append(f"{where}: argparse did not refuse it: {err.strip()[-300:]}")
    return problems


@pytest.mark.parametrize("words", list(BASES), ids=" ".join)
def test_bad_numbers_and_paths_are_one_line_errors(words, tmp_path, monkeypatch, capsys):
    if BASES[words] is None:
        assert list(_cases(words)) == [], f"lucid {' '.join(words)} has numeric or path options: give it a base"
        return

    def stop(*args, **kwargs):
        raise WorkStarted()

    for target in WORK:
        monkeypatch.setattr(target, stop)
    monkeypatch.chdir(tmp_path)
    before = _repository_state()
    paths = _materials(tmp_path / "base")
    monkeypatch.chdir(tmp_path / "base")
    problems = _problems_of_case(words, None, paths, capsys, FIRST_LIMIT_S)  # and the imports, once
    for index, override in enumerate(_cases(words)):
        paths = _materials(tmp_path / f"case{index}")
        monkeypatch.chdir(tmp_path / f"case{index}")
        problems += _problems_of_case(words, override, paths, capsys)
    assert _repository_state() == before, "a case wrote into the repository"
    assert problems == [], "\n".join(problems)
