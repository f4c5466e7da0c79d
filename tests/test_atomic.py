"""Atomic writes replace only regular files, and the staging a killed writer leaves is removed by the next one.

Devices, FIFOs and sockets are real nodes made in tmp_path (a character device needs root); killed writers
are real processes killed with real signals.
"""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lucid_megatron.atomic import (OutputPathError, check_output_dir, check_output_file, staged_directory,
                                   write_text)

ROOT = Path(__file__).resolve().parents[1]


def _char_device(path: Path) -> Path:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # the numbers of /dev/null
    except PermissionError:
        pytest.skip("making a character device needs root (CAP_MKNOD)")
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.close()  # the node stays after the socket is closed
    return path


def _symlink_to_char_device(path: Path) -> Path:
    _char_device(path.with_name("device"))
    path.symlink_to("device")
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink_to_directory(path: Path) -> Path:
    path.with_name("real").mkdir()
    path.symlink_to("real")
    return path


NOT_FILES = {  # how to make it, what the error calls it
    "char-device": (_char_device, "a character device"),
    "fifo": (_fifo, "a FIFO"),
    "socket": (_socket, "a socket"),
    "symlink-to-char-device": (_symlink_to_char_device, "a symlink to a character device"),
    "directory": (_directory, "a directory"),
    "symlink-to-directory": (_symlink_to_directory, "a symlink to a directory"),
}


def _modes(directory: Path) -> dict[str, int]:
    """Every entry of ``directory`` and its type (lstat): what a refused write must leave exactly as it was."""
    return {p.name: stat.S_IFMT(p.lstat().st_mode) for p in directory.iterdir()}


@pytest.mark.parametrize("kind", NOT_FILES)
def test_a_file_write_refuses_what_is_not_a_regular_file(kind, tmp_path):
    make, called = NOT_FILES[kind]
    target = make(tmp_path / "out.json")
    before = _modes(tmp_path)
    message = f"output '{target}' is {called}; it must be a regular file or a new path"
    for write in (check_output_file, lambda path: write_text(path, "{}")):
        with pytest.raises(OutputPathError) as refused:
            write(target)
        assert str(refused.value) == message
    assert _modes(tmp_path) == before  # the node is what it was, and nothing was staged beside it


def test_the_label_names_the_option(tmp_path):
    _fifo(tmp_path / "pipe")
    with pytest.raises(OutputPathError, match=r"^--out '.*pipe' is a FIFO; it must be a regular file or a new path$"):
        check_output_file(tmp_path / "pipe", label="--out")


@pytest.mark.parametrize("kind", ["char-device", "fifo", "socket", "symlink-to-char-device",
                                  "symlink-to-directory"])
def test_a_directory_output_refuses_what_is_not_a_directory(kind, tmp_path):
    make, called = NOT_FILES[kind]
    target = make(tmp_path / "out")
    before = _modes(tmp_path)
    message = f"output directory '{target}' is {called}; it must be a new path or an empty directory"
    with pytest.raises(OutputPathError) as refused:
        check_output_dir(target)
    assert str(refused.value) == message
    with pytest.raises(OutputPathError) as refused:
        with staged_directory(target):
            pytest.fail("the block ran: the output was not checked before the work")
    assert str(refused.value) == message
    assert _modes(tmp_path) == before


def test_a_directory_output_refuses_a_file_and_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(OutputPathError, match="file' is a regular file; it must be a new path or an empty directory"):
        check_output_dir(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="'.*full' exists and is not empty"):
        check_output_dir(tmp_path / "full")
    (tmp_path / "empty").mkdir()
    with staged_directory(tmp_path / "empty") as staging:
        (staging / "x").write_text("new")
    assert (tmp_path / "empty" / "x").read_text() == "new" and (tmp_path / "file").read_text() == "keep"


def test_regular_files_and_links_to_them_are_replaced(tmp_path):
    (tmp_path / "out.json").write_text("old")
    write_text(tmp_path / "out.json", "new")
    assert (tmp_path / "out.json").read_text() == "new"
    (tmp_path / "elsewhere.json").write_text("theirs")
    (tmp_path / "link.json").symlink_to("elsewhere.json")
    write_text(tmp_path / "link.json", "ours")  # the link itself is replaced; what it named is untouched
    assert not (tmp_path / "link.json").is_symlink() and (tmp_path / "link.json").read_text() == "ours"
    assert (tmp_path / "elsewhere.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.json", "link.json", "out.json"]


# ----------------------------------------------------------------------------------------- stale staging


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_the_next_write_removes_staging_of_dead_writers_only(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".x.tmp-{dead}-abcd").write_text("half")
    (tmp_path / f".x.tmp-{dead}-ef01").mkdir()
    (tmp_path / f".x.tmp-{dead}-ef01" / "part").write_text("half")
    (tmp_path / f".x.tmp-{alive}-abcd").write_text("being written")
    (tmp_path / f".y.tmp-{dead}-abcd").write_text("another target's")
    (tmp_path / ".x.tmp-notapid").write_text("not a staging name")
    write_text(tmp_path / "x", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".x.tmp-{alive}-abcd", f".y.tmp-{dead}-abcd", ".x.tmp-notapid", "x"])

    (tmp_path / f".out.tmp-{dead}-abcd").mkdir()
    with staged_directory(tmp_path / "out") as staging:
        (staging / "f").write_text("new")
    assert not (tmp_path / f".out.tmp-{dead}-abcd").exists() and (tmp_path / "out" / "f").read_text() == "new"


_STAGE_AND_WAIT = """
import sys, time
from lucid_megatron.atomic import staged_directory
with staged_directory(sys.argv[1]) as staging:
    (staging / "half").write_text("x")
    print(staging, flush=True)
    time.sleep(120)
"""


def _staging_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of a staged write of ``out``, and its staging directory."""
    writer = subprocess.Popen([sys.executable, "-c", _STAGE_AND_WAIT, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    staging = Path(writer.stdout.readline().strip())
    assert staging.parent == out.parent and staging.name.startswith(f".{out.name}.tmp-{writer.pid}-"), staging
    return writer, staging


def test_staging_of_a_sigkilled_writer_is_removed_by_the_next_write(tmp_path):
    writer, staging = _staging_writer(tmp_path / "hk")
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    assert staging.is_dir() and not (tmp_path / "hk").exists()  # what SIGKILL leaves
    with staged_directory(tmp_path / "hk") as again:
        (again / "f").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hk"] and (tmp_path / "hk" / "f").read_text() == "done"


def test_sigterm_during_a_staged_write_leaves_nothing(tmp_path):
    writer, staging = _staging_writer(tmp_path / "big")
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_lucid_data_synth_leaves_nothing(tmp_path):
    out = tmp_path / "big"
    synth = subprocess.Popen([sys.executable, "-m", "lucid_megatron", "data", "synth", str(out),
                              "--train-docs", "1000000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".big.tmp-") for p in tmp_path.iterdir()):
        assert synth.poll() is None and time.monotonic() < deadline, "synth ended before it staged anything"
        time.sleep(0.05)
    synth.send_signal(signal.SIGTERM)
    synth.wait(timeout=60)
    assert synth.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), synth.stderr.read()
    assert list(tmp_path.iterdir()) == []
