"""Slow, independent checks started when the test session starts; their tests collect the results.

A few checks run one external program and then only read what it wrote (the Triton compile matrix, the GPU
selftest's CPU smoke). Started up front at the lowest CPU priority, they run on the cycles the rest of the
suite leaves idle (processes importing, waiting on sockets, on SLURM, on signals) instead of after it; the
tests that read them are moved to the end of the session, so that by then the wait is short.

Under pytest-xdist every worker collects the same items: the first worker (or the only process) starts the
jobs, into a directory the controller names (``LUCID_TEST_JOBS_DIR``), and any worker reads them through the
files they leave there (output, exit code). The controller kills what is still running when the session ends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

JOBS_DIR_VARIABLE = "LUCID_TEST_JOBS_DIR"


@dataclasses.dataclass
class Job:
    name: str
    test_file: str  # the tests that read this job live in this file (path relative to the repository)
    commands: Callable[[Path], list[list[str]]]  # run side by side, each with its output in the work dir
    env: Callable[[Path], dict[str, str]]
    timeout_s: float = 1800.0

    @property
    def workdir(self) -> Path:
        return jobs_dir() / self.name

    def start(self) -> None:
        self.workdir.mkdir(parents=True)
        (self.workdir / "started").write_text(str(time.time()))
        env = self.env(self.workdir)
        for index, command in enumerate(self.commands(self.workdir)):
            # the exit code goes to a file, so that another pytest process (an xdist worker) can read it
            wrapped = ["sh", "-c", '"$@"; echo $? > "$0"', str(self.workdir / f"exit_{index}"), *command]
            with open(self.workdir / f"output_{index}.log", "wb") as log:
                proc = subprocess.Popen(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                        preexec_fn=lambda: os.nice(19), start_new_session=True)
            (self.workdir / f"pid_{index}").write_text(str(proc.pid))

    def result(self) -> Path:
        """Wait for every command; the work dir. Fails the calling test with the output of a failed one."""
        if not (self.workdir / "started").exists():  # e.g. selected after collection (--lf): start it now
            self.start()
        deadline = float((self.workdir / "started").read_text()) + self.timeout_s
        for pid_file in sorted(self.workdir.glob("pid_*")):
            index = pid_file.name.split("_")[1]
            exit_file = self.workdir / f"exit_{index}"
            while not exit_file.exists() or not exit_file.read_text().strip():
                if time.time() > deadline:
                    pytest.fail(f"background job {self.name} did not finish within {self.timeout_s:g} s")
                time.sleep(0.5)
            code = int(exit_file.read_text())
            if code != 0:
                output = (self.workdir / f"output_{index}.log").read_text(errors="replace")
                pytest.fail(f"background job {self.name} (command {index}) exited {code}:\n{output[-6000:]}")
        return self.workdir


def _compile_commands(work: Path) -> list[list[str]]:
    # the compiler is single-threaded: the two GPU generations compile side by side
    return [[sys.executable, "-m", "lucid_triton.compile_check", "--arch", str(arch), "--json",
             str(work / f"sm{arch}.json")] for arch in (80, 90)]


def _compile_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels cannot compile
    env["TRITON_CACHE_DIR"] = str(work / "cache")  # a clean cache: really compile
    return env


def _selftest_commands(work: Path) -> list[list[str]]:
    from lucid_megatron.runtime.commands import process_command

    # --budget: the timing part stops early once it is spent; at the lowest priority this job can wait long
    # for a core, and that must not change what it measures
    return [process_command(["selftest", "gpu", "--out", str(work / "selftest"), "--cpu-smoke", "--budget", "3600"])]


def _selftest_env(work: Path) -> dict[str, str]:
    return dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")


JOBS = {
    job.name: job for job in (
        Job("compile", "tests/kernels/test_compile.py", _compile_commands, _compile_env),
        Job("selftest", "tests/selftest/test_gpu_selftest.py", _selftest_commands, _selftest_env),
    )
}


def jobs_dir() -> Path:
    return Path(os.environ[JOBS_DIR_VARIABLE])


def job(name: str) -> Job:
    return JOBS[name]


def _job_of(item) -> Job | None:
    path = item.nodeid.split("::", 1)[0]
    return next((job for job in JOBS.values() if job.test_file == path), None)


def open_session() -> None:
    """In the controller (or the only process), before any worker starts: the directory the jobs write to."""
    if JOBS_DIR_VARIABLE not in os.environ:
        os.environ[JOBS_DIR_VARIABLE] = tempfile.mkdtemp(prefix="lucid-test-jobs-")


def reads_a_job(item) -> bool:
    return _job_of(item) is not None


def start_jobs(items: list) -> None:
    """In the first worker (or the only process): start the jobs the selected tests read. Run those tests last
    (``reads_a_job``), so that by the time they ask, the jobs have had the whole session."""
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    for job in {job.name: job for job in map(_job_of, items) if job is not None}.values():
        if not (job.workdir / "started").exists():
            job.start()


def close_session() -> None:
    """In the controller (or the only process), after every test: stop what still runs and remove the files."""
    root = Path(os.environ.get(JOBS_DIR_VARIABLE, ""))
    if not os.environ.get(JOBS_DIR_VARIABLE) or not root.is_dir():
        return
    for pid_file in root.glob("*/pid_*"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError, ValueError):
            pass
    shutil.rmtree(root, ignore_errors=True)
