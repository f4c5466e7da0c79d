"""A checkpoint being read survives the keep_last rotation of its run; a reader never takes a rotated one for
a damaged one.

The checkpoints are step directories with a COMPLETE file (all the rotation and the reader look at), and
those of a real `lucid train` run; the readers hold real flocks, in this process or in a thread, against the
real rotation.
"""

import fcntl
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lucid_megatron.checkpoint import Checkpointer, reading


def _save(root: Path, step: int) -> Path:
    """Publish a (content-free) checkpoint the way a save does: the step directory, then ``latest``."""
    step_dir = root / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "state.json").write_text(f'{{"step": {step}}}')
    (step_dir / "COMPLETE").write_text("")
    (root / "latest").write_text(step_dir.name)
    return step_dir


def _steps(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def test_a_checkpoint_being_read_outlives_rotation_until_released(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    notes = []
    checkpointer = Checkpointer(root, keep_last=1, say=notes.append)
    _save(root, 1)
    with reading(tmp_path / "run") as held:
        assert held == root / "step_00000001"
        _save(root, 2)
        assert checkpointer.remove_old() == []
        _save(root, 3)
        assert checkpointer.remove_old() == [root / "step_00000002"]  # the unread one goes as usual
        assert _steps(root) == ["step_00000001", "step_00000003"]
        assert (held / "state.json").read_text() == '{"step": 1}'
    assert notes == [f"keeping {held} for now: a reader (lucid convert, lucid eval) holds it; a later save "
                     "removes it"]  # said once, though two rotations kept it
    _save(root, 4)
    assert checkpointer.remove_old() == [root / "step_00000001", root / "step_00000003"]
    assert _steps(root) == ["step_00000004"] and len(notes) == 1


def test_readers_share_a_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    with reading(root) as first, reading(root / "step_00000001") as second:  # e.g. the ranks of one evaluation
        assert first == second
        _save(root, 2)
        assert Checkpointer(root, keep_last=1, say=lambda text: None).remove_old() == []
    assert Checkpointer(root, keep_last=1).remove_old() == [root / "step_00000001"]


def _wait_until_blocked() -> None:
    """Until this process (the reader's thread) waits for a shared flock (a ``->`` line of /proc/locks)."""
    waiting = re.compile(rf"-> FLOCK\s+ADVISORY\s+READ\s+{os.getpid()}\s")
    deadline = time.monotonic() + 30
    while not waiting.search(Path("/proc/locks").read_text()):
        assert time.monotonic() < deadline, "the reader never waited for the lock"
        time.sleep(0.01)


def _read_in_a_thread(path: Path) -> tuple[threading.Thread, list, list]:
    got, notes = [], []

    def read():
        try:
            with reading(path, say=notes.append) as checkpoint:
                got.append(checkpoint)
        except FileNotFoundError as err:
            got.append(err)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, got, notes


def _rotate_while_holding(root: Path, old: Path, new_step: int) -> None:
    """What a rotation does to ``old`` once it holds its exclusive lock, after the save of ``new_step``."""
    _save(root, new_step)
    (old / "COMPLETE").unlink()
    shutil.rmtree(old)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see the reader wait")
def test_a_reader_whose_checkpoint_is_rotated_before_it_holds_it_reads_the_new_latest(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    _save(root, 1)
    old = _save(root, 2)
    rotation = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(rotation, fcntl.LOCK_EX)  # the rotation is removing it: the reader found it, and waits
    thread, got, notes = _read_in_a_thread(tmp_path / "run")
    try:
        _wait_until_blocked()
        _rotate_while_holding(root, old, 3)
    finally:
        os.close(rotation)
        thread.join(timeout=30)
    assert got == [root / "step_00000003"]
    assert notes == [f"step_00000002 was removed by its run's checkpoint rotation (keep_last) before it could be "
                     f"read; reading {root / 'step_00000003'} instead"]


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks to see the reader wait")
def test_a_step_named_explicitly_and_rotated_is_reported_as_removed(tmp_path):
    root = tmp_path / "checkpoints"
    old = _save(root, 1)
    rotation = os.open(old, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(rotation, fcntl.LOCK_EX)
    thread, got, notes = _read_in_a_thread(old)
    try:
        _wait_until_blocked()
        _rotate_while_holding(root, old, 2)
    finally:
        os.close(rotation)
        thread.join(timeout=30)
    assert len(got) == 1 and isinstance(got[0], FileNotFoundError), got
    gone = (f"checkpoint '{old}' does not exist: a run keeps only its newest checkpoint.keep_last checkpoints (it "
            "removes older ones as it trains); give the run directory to read its newest")
    assert str(got[0]) == gone and notes == []
    with pytest.raises(FileNotFoundError) as again:  # named once it is gone: the same, not "does not exist"
        with reading(old):
            pass
    assert str(again.value) == gone


def _latest_step(root: Path) -> int:
    try:
        return int((root / "latest").read_text().removeprefix("step_"))
    except (FileNotFoundError, ValueError):
        return 0


def _wait_for_step(root: Path, step: int, training: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while _latest_step(root) < step:
        assert training.poll() is None, training.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"no checkpoint of step {step} within 300 s"
        time.sleep(0.05)


def test_reading_a_run_that_is_still_training(tmp_path):
    """`lucid train` saving every step with keep_last 1: the checkpoint held stays whole through the saves made
    while it is read and goes at the first save after."""
    from lucid_megatron.checkpoint import checkpoint_problem
    from tests.train.runs import small_training_config, train_command, train_env

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    training = subprocess.Popen(
        train_command(small_training_config(tmp_path), run_dir, overrides=[
            "train.steps=16", "checkpoint.interval=1", "checkpoint.keep_last=1", "data.eval_rows=0"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
    try:
        _wait_for_step(root, 1, training)
        with reading(run_dir) as held:
            step = int(held.name.removeprefix("step_"))
            _wait_for_step(root, step + 2, training)  # two saves, each rotating, while it is held
            assert checkpoint_problem(held, rank=0) is None
        _wait_for_step(root, step + 4, training)  # the save of step + 3 has rotated, all of it
        assert not held.exists()
        stdout, stderr = training.communicate(timeout=300)
    finally:
        training.kill()
    assert training.returncode == 0, stderr[-4000:]
    # the trainer's rank 0 says it on the console (lucid train: ...), once
    assert stdout.count(f"keeping {held} for now") == 1, stdout[-4000:]
    assert _steps(root) == ["step_00000016"]
