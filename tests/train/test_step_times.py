"""Each rank's step time, gathered at every logged step; a slow rank named with its host (train/step_times.py)."""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from lucid_megatron.train.step_times import COLUMNS, own_time, rank_time_report
from tests.train.runs import metrics, small_training_config, train_command, train_env


def test_the_report_names_ranks_slower_than_the_factor_times_the_median():
    # columns: step, data_wait, compute, optimizer, checkpoint, collective_wait, evaluation (seconds per step)
    rows = [[1.0, 0.05, 0.80, 0.10, 0.05, 0.60, 0.2],   # own 0.40: waited 0.60 for rank 2
            [1.0, 0.05, 0.80, 0.10, 0.05, 0.55, 0.2],   # own 0.45
            [1.0, 0.30, 0.60, 0.10, 0.00, 0.05, 0.2]]   # own 0.95: data-bound (evaluation is not a step's own time)
    assert COLUMNS == ("step", "data_wait", "compute", "optimizer", "checkpoint", "collective_wait", "evaluation")
    assert [own_time(r) for r in rows] == pytest.approx([0.40, 0.45, 0.95], abs=1e-12)
    metrics, lines = rank_time_report(rows, ["a", "b", "c"], factor=1.5)
    assert metrics["rank_time/slowest_rank"] == 2 and metrics["rank_time/stragglers"] == 1
    assert metrics["rank_time/slowest_s"] == pytest.approx(0.95) and metrics["rank_time/median_s"] == pytest.approx(0.45)
    assert metrics["rank_time/spread"] == pytest.approx((0.95 - 0.40) / 0.45)
    assert metrics["time/data_wait_s"] == pytest.approx(0.05) and metrics["time/collective_wait_s"] == pytest.approx(0.55)
    assert lines == ["rank 2 (host c) is slow: 0.950 s of its own work per step, 2.11x the median 0.450 s "
                     "(logging.straggler_factor=1.5); data wait 0.300 s, compute 0.600 s, optimizer 0.100 s, "
                     "checkpoint 0.000 s, collective wait 0.050 s, evaluation 0.200 s"]
    assert rank_time_report(rows, ["a", "b", "c"], factor=2.2)[1] == []  # 2.11x is not above 2.2x


def _throttle(pid: int, stop: threading.Event, stopped_s: float = 0.08, running_s: float = 0.02):
    """Run ``pid`` a fifth of the time (SIGSTOP/SIGCONT), as a slow or shared node would."""
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(running_s)
        except ProcessLookupError:
            return


def test_a_throttled_rank_is_named_with_its_host(tmp_path):
    config = small_training_config(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        # One row per micro-batch: 4 per rank and step, each forward ending in a collective that absorbs the
        # slow rank's delay (only the last backward's shows in DeepSpeed's gradient reduction, as compute).
        train_command(config, run_dir, nproc=2, overrides=["train.steps=45", "logging.interval=15",
                                                           "train.micro_batch_size=1", "logging.straggler_factor=1.2"]),
        env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        record = None
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                record = json.loads((run_dir / "progress" / "rank_1.json").read_bytes().rstrip())
                if record["phase"].startswith("training step"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert record is not None and proc.poll() is None, proc.communicate()
        throttle = threading.Thread(target=_throttle, args=(record["pid"], stop), daemon=True)
        throttle.start()
        out, err = proc.communicate(timeout=600)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    host = record["host"]
    logged = [r for r in metrics(run_dir) if "rank_time/slowest_rank" in r]
    assert [r["step"] for r in logged] == [15, 30, 45]
    for r in logged[1:]:  # the first interval includes the start, before the throttle
        times = {k: v for k, v in r.items() if "time" in k}
        assert r["rank_time/slowest_rank"] == 1 and r["rank_time/stragglers"] == 1, times
        assert r["rank_time/slowest_s"] > 1.2 * r["rank_time/median_s"], times
        assert set(r) >= {f"time/{c}_s" for c in COLUMNS[1:]}
    assert f"step 30: rank 1 (host {host}) is slow: " in out and f"step 45: rank 1 (host {host}) is slow: " in out, out
    assert "rank 0 (host" not in out, out
