"""The restart supervisor's decisions (train/restarts.py), with attempts that leave the records a crashed
torchrun job leaves: a progress record per rank, an elastic agent's failure record, status.json."""

import json
import time

import pytest

from lucid_megatron.train.restarts import RestartPolicy, supervise
from lucid_megatron.runtime.elastic_agent import FAILURE_RECORDS, write_failure_record
from lucid_megatron.train.progress import RankProgress
from lucid_megatron.train.status import read_status, write_status


@pytest.fixture(autouse=True)
def _restore_environment(monkeypatch):
    monkeypatch.setenv(FAILURE_RECORDS, "")  # supervise() sets it for its attempts; restored after each test


class _Failure:  # the fields of torchrun's ProcessFailure that the agent records
    def __init__(self, pid, exitcode):
        self.local_rank, self.pid, self.exitcode, self.timestamp = 0, pid, exitcode, int(time.time())


def _crash_at(run_dir, steps):
    """An attempt per step in ``steps``: rank 1 is killed (SIGKILL) at that step; then one that finishes."""
    steps = list(steps)

    def attempt(restarted):
        if not steps:
            write_status(run_dir, "finished", 99)
            return 0
        step = steps.pop(0)
        progress = RankProgress(run_dir, 1)
        progress.enter(f"training step {step}", step)
        progress.close()
        write_failure_record(run_dir / "failures", {1: _Failure(4242, -9)})
        return 1

    return attempt


def test_restarts_until_the_run_finishes_and_records_each(tmp_path):
    said = []
    code = supervise(tmp_path, _crash_at(tmp_path, [3, 7]), RestartPolicy(3, 2, backoff_s=0.01), said.append)
    status = read_status(tmp_path)
    assert code == 0 and status["state"] == "finished"
    assert [(r["step"], r["rank"], r["cause"], r["restart"], r["backoff_s"]) for r in status["restarts"]] == \
        [(3, 1, "killed by SIGKILL", 1, 0.01), (7, 1, "killed by SIGKILL", 2, 0.02)]
    assert said[1] == "lucid: restart 1/3 in 0.01 s, from the start (no checkpoint yet); " \
        f"{status['restarts'][0]['time_lost_s']:.1f} s of training is done again"


@pytest.mark.parametrize("steps,policy,reason", [
    ([3, 5, 8, 9], RestartPolicy(2, 2, 0.0), "not restarting: 2 restart(s) already (launch.max_restarts=2)"),
    ([4, 6, 6, 6], RestartPolicy(5, 3, 0.0), "rank 1 (host "),
    ([5], RestartPolicy(0, 2, 0.0), "(launch.max_restarts=0)"),
])
def test_stops_after_max_restarts_or_a_repeated_step(tmp_path, steps, policy, reason):
    said = []
    code = supervise(tmp_path, _crash_at(tmp_path, steps), policy, said.append)
    status = read_status(tmp_path)
    assert code == 1 and status["state"] == "failed" and reason in status["reason"], status
    assert said[-1] == f"lucid: {status['reason']}"
    if policy.max_same_step_failures == 3:
        assert "at step 6 in phase 'training step 6' failed 3 times in a row" in status["reason"]
        assert len(status["restarts"]) == 3  # steps 4, 6, 6: the third 6 stops
    else:
        assert len(status["restarts"]) == policy.max_restarts


def test_a_finished_status_from_an_earlier_attempt_is_not_taken_for_this_one(tmp_path):
    write_status(tmp_path, "finished", 10)  # an earlier job's
    time.sleep(0.01)
    code = supervise(tmp_path, _crash_at(tmp_path, [12]), RestartPolicy(0, 2, 0.0), lambda _: None)
    assert code == 1 and json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_backoff_doubles_up_to_eight_times():
    assert [RestartPolicy(backoff_s=10).backoff(n) for n in range(1, 7)] == [10, 20, 40, 80, 80, 80]
