"""`lucid launch slurm` against a real single-host SLURM cluster (munged + slurmctld + 2 slurmd)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from tests.train.runs import run_train, train_records

from .slurm_cluster import SlurmCluster, missing_requirements

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    """The demo config, made small: its own little dataset, short rows, every step logged."""
    data = tmp_path_factory.mktemp("data") / "synth"
    write_synth_dataset(data, RetrievalTask(min_len=128, max_len=256, num_needles=2, num_queries=1),
                        train_docs=400, valid_docs=16, docs_per_shard=50, seed=0, tokenizer=ByteTokenizer())
    return [f"data.path={data}", "train.seq_length=256", "data.eval_rows=8", "logging.interval=1",
            "final_eval.lengths=[160]", "final_eval.num_samples=2"]


def _launch(cluster, run_dir, *args, overrides=()):
    command = [sys.executable, "-m", "lucid_megatron", "launch", "slurm", *args, CONFIG, "--run-dir", str(run_dir)]
    for assignment in overrides:
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "submitted job" in result.stdout and (run_dir / "slurm" / "job.sbatch").exists()
    return result.stdout.split()[2].rstrip(":")


# Every job that trains for real runs this many steps: one direct run is the reference for all of them. Enough that
# the warning signal (after step 3) finds the requeue test's run training.
STEPS = 20


@pytest.fixture(scope="module")
def direct(overrides, tmp_path_factory):
    """The records of the same config through torchrun directly (lucid train --nproc-per-node 2, STEPS steps),
    trained once and shared by the jobs compared with it. Only its training records are read, so it leaves out
    final_eval (which runs after the last step and changes none of them)."""
    root = tmp_path_factory.mktemp("direct")
    config = yaml.safe_load(Path(CONFIG).read_text())
    del config["final_eval"]
    (root / "demo.yaml").write_text(yaml.safe_dump(config))
    run_train(root / "demo.yaml", root / "run", nproc=2, overrides=overrides + [f"train.steps={STEPS}"])
    return train_records(root / "run")


def _node_log(run_dir) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*-node*.log")))


def _job_logs(run_dir) -> str:
    """The batch script's and the nodes' logs, for a failure message."""
    return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "slurm").glob("*.*"))
                   if p.suffix in (".out", ".log"))


@pytest.mark.parametrize("nodes,nproc", [(1, 2), (2, 1)], ids=["1-node-2-procs", "2-nodes-1-proc-each"])
def test_job_matches_direct_torchrun(cluster, overrides, direct, tmp_path, nodes, nproc):
    run_dir = tmp_path / "slurm-run"
    job = _launch(cluster, run_dir, "--nodes", str(nodes), "--nproc-per-node", str(nproc),
                  overrides=overrides + [f"train.steps={STEPS}"])
    assert cluster.wait(job) == "COMPLETED", _job_logs(run_dir)
    log = _node_log(run_dir)
    assert "world 2 = DP 2 x CP 1 x TP 1" in log
    got, want = train_records(run_dir), direct
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert f"step {STEPS}/{STEPS} [########################]  loss {want[STEPS]['loss']:.4f}" in log
    if nodes == 2:
        assert (run_dir / "slurm" / f"lucid-demo-{job}-node1.log").exists()  # per-node logs


def test_warning_signal_checkpoints_requeues_and_resumes(cluster, overrides, direct, tmp_path):
    run_dir = tmp_path / "slurm-run"
    # Enough steps that the signal (after step 3) finds the run training; should it come during final_eval
    # instead, that too is a preemption the requeued job resumes (it evaluates), and everything below holds.
    steps = [f"train.steps={STEPS}"]
    job = _launch(cluster, run_dir, "--nodes", "1", "--nproc-per-node", "2", overrides=overrides + steps)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(train_records(run_dir), default=0) >= 3:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"job {job} never reached step 3 ({cluster.job_state(job)}):\n{_job_logs(run_dir)}")
    # What SLURM does --signal-seconds before the time limit: SIGUSR1 to the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cluster.env)
    assert cluster.wait(job, timeout=900) == "COMPLETED", _job_logs(run_dir)
    batch_log = (run_dir / "slurm" / f"lucid-demo-{job}.out").read_text()
    assert "requeueing job" in batch_log and "restart 1/3" in batch_log and "run finished" in batch_log
    assert "received SIGUSR1" in _node_log(run_dir)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=cluster.env).stdout
    assert "Restarts=1" in show
    got, want = train_records(run_dir), direct
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS]["loss"] == want[STEPS]["loss"]
    assert (run_dir / "eval" / "niah.json").exists()


def _rank_record(run_dir, rank) -> dict | None:
    try:
        return json.loads((run_dir / "progress" / f"rank_{rank}.json").read_bytes().rstrip())
    except (OSError, ValueError):
        return None


def _wait_for(predicate, what, job, cluster, run_dir, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"job {job}: {what} never happened ({cluster.job_state(job)}):\n{_job_logs(run_dir)}")


def _training(run_dir, rank, step, *, not_pid=None):
    """Rank ``rank``'s record once it trains step >= ``step`` (in a process other than ``not_pid``)."""
    record = _rank_record(run_dir, rank)
    if record and record["pid"] != not_pid and record["step"] >= step and record["phase"].startswith("training step"):
        return record
    return None


def test_a_killed_and_a_hung_worker_restart_the_job_which_completes(cluster, overrides, direct, tmp_path):
    """2 nodes x 1 process: SIGKILL of the second node's worker at a random step, later SIGSTOP of it inside a
    step: each time the job restarts in its allocation (a new job step, the same rendezvous port) from the last
    checkpoint and, in the end, trains every step as the uninterrupted run did."""
    run_dir = tmp_path / "slurm-run"
    kill_at, stop_at = random.randint(5, 9), random.randint(13, 16)
    job = _launch(cluster, run_dir, "--nodes", "2", "--nproc-per-node", "1",
                  overrides=overrides + [f"train.steps={STEPS}", "checkpoint.interval=4", "train.hang_timeout_s=10",
                                         "launch.restart_backoff_s=1"])
    killed = _wait_for(lambda: _training(run_dir, 1, kill_at), f"step {kill_at}", job, cluster, run_dir)
    os.kill(killed["pid"], signal.SIGKILL)
    stopped = _wait_for(lambda: _training(run_dir, 1, stop_at, not_pid=killed["pid"]), f"step {stop_at} after "
                        f"the restart (kill at {kill_at})", job, cluster, run_dir)
    os.kill(stopped["pid"], signal.SIGSTOP)
    rank0_log = run_dir / "logs" / "rank_0.log"
    _wait_for(lambda: rank0_log.exists() and "no progress for" in rank0_log.read_text(), "the hang report", job,
              cluster, run_dir, timeout=120)
    # Rank 1 stays stopped until the report is written; continuing it then spares torchrun's 30 s SIGKILL wait.
    os.kill(stopped["pid"], signal.SIGCONT)
    assert cluster.wait(job, timeout=600) == "COMPLETED", _job_logs(run_dir)

    report = rank0_log.read_text()
    hang = report[report.index("no progress for"):]
    assert f"' (step {stopped['step']}); Python stacks" in hang.splitlines()[0], hang[:2000]
    assert "Python stacks of every thread follow" in hang and 'lucid_megatron/train/' in hang, hang[:4000]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and len(status["restarts"]) == 2, status
    crash, hung = status["restarts"]
    assert crash["cause"].startswith("killed by SIGKILL") and crash["rank"] == 1, crash
    assert killed["step"] <= crash["step"] <= killed["step"] + 1 and crash["resumes_from"] <= crash["step"], crash
    assert "hang: no progress" in hung["cause"] and hung["step"] in (stopped["step"], stopped["step"] + 1), hung
    batch_log = (run_dir / "slurm" / f"lucid-demo-{job}.out").read_text()
    assert "lucid: restart 1/3 in 1 s, from the checkpoint of step" in batch_log, batch_log
    assert "lucid: restart 2/3 in 2 s" in batch_log and "run finished" in batch_log, batch_log
    got, want = train_records(run_dir), direct
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want], (kill_at, stop_at)


def test_a_crash_at_the_same_step_stops_after_the_allowed_retries(cluster, overrides, tmp_path):
    """A dataset with a truncated shard: the job fails at the same step twice and stops, naming step and rank."""
    data = tmp_path / "damaged"
    shutil.copytree(next(o for o in overrides if o.startswith("data.path=")).split("=", 1)[1], data)
    shard = data / "train-000005.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run_dir = tmp_path / "slurm-run"
    job = _launch(cluster, run_dir, "--nodes", "1", "--nproc-per-node", "2",
                  overrides=overrides + [f"data.path={data}", f"train.steps={STEPS}", "launch.restart_backoff_s=1"])
    assert cluster.wait(job, timeout=600) == "FAILED", _job_logs(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and len(status["restarts"]) == 1, status
    first = status["restarts"][0]
    assert f"{shard} is corrupt or truncated" in first["cause"], first
    where = f"rank {first['rank']} (host "
    assert status["reason"].startswith(where) and f"at step {first['step']} in phase 'training step" in \
        status["reason"], status["reason"]
    assert "failed 2 times in a row" in status["reason"] and "launch.max_same_step_failures=2" in status["reason"]
    batch_log = (run_dir / "slurm" / f"lucid-demo-{job}.out").read_text()
    assert batch_log.count("lucid: the job failed: ") == 2 and "failed 2 times in a row" in batch_log, batch_log
    assert "requeueing" not in batch_log and "training did not finish (state failed" in batch_log, batch_log


def test_scancel_leaves_no_process_behind(cluster, overrides, tmp_path):
    run_dir = tmp_path / "slurm-run"
    job = _launch(cluster, run_dir, "--nodes", "2", "--nproc-per-node", "1",
                  overrides=overrides + ["train.steps=100000"])
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    status = subprocess.run([sys.executable, "-m", "lucid_megatron", "launch", "status", job],
                            capture_output=True, text=True, env=cluster.env)
    assert "RUNNING" in status.stdout
    subprocess.run([sys.executable, "-m", "lucid_megatron", "launch", "cancel", job], check=True, env=cluster.env)
    assert cluster.wait(job, timeout=120) == "CANCELLED"

    def leftovers():
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(run_dir) in " ".join(proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        return found

    deadline = time.monotonic() + 90  # SLURM's KillWait (30 s) before it escalates to SIGKILL
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert leftovers() == []


def test_sweep_runs_a_job_array(cluster, overrides, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump([["model.lucid_layers=all"], ["model.lucid_layers=none"]]))
    run_dir = tmp_path / "sweep-run"
    job = _launch(cluster, run_dir, "--nodes", "1", "--nproc-per-node", "1", "--sweep", str(sweep),
                  overrides=overrides + ["train.steps=2", "data.num_streams=4"])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "--states=all", "-h", "-j", job, "-o", "%i %T"], capture_output=True,
                             text=True, env=cluster.env).stdout.split("\n")
        states = [line.split()[1] for line in out if line.strip()]
        if len(states) == 2 and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states):
            break
        time.sleep(0.5)
    assert states == ["COMPLETED", "COMPLETED"], out
    patterns = [yaml.safe_load((run_dir / f"task-{i}" / "config.yaml").read_text())["model"]["lucid_layers"]
                for i in (0, 1)]
    assert patterns == ["all", "none"]
    for i in (0, 1):
        assert json.loads((run_dir / f"task-{i}" / "status.json").read_text())["state"] == "finished"


def test_dry_run_renders_a_multi_node_gpu_job(tmp_path):
    """No cluster needed: the script for 4 nodes x 8 GPUs says what it should."""
    result = subprocess.run(
        [sys.executable, "-m", "lucid_megatron", "launch", "slurm", "--nodes", "4", "--gpus-per-node", "8",
         "--partition", "gpu", "--account", "proj", "--qos", "high", "--time", "02:00:00", "--signal-seconds", "300",
         "--max-requeue", "5", str(REPO / "configs" / "1b-2k.yaml"), "--run-dir", str(tmp_path / "run"),
         "--set", "checkpoint.interval=500", "--dry-run"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --time=02:00:00", "#SBATCH --signal=USR1@300", "#SBATCH --requeue",
                 "set -euo pipefail", "MAX_REQUEUE=5", "NPROC_PER_NODE=8",
                 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                 "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))",
                 '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID"',
                 '--nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE"',
                 "--resume auto", "OVERRIDES=(--set checkpoint.interval=500)",
                 'scontrol requeue "$SLURM_JOB_ID"', "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 '"$PYTHON" -m lucid_megatron.train.restarts "$CONFIG" --run-dir "$RUN_DIR" "${OVERRIDES[@]}" -- \\',
                 '"$PYTHON" -m lucid_megatron.runtime.elastic_agent \\', "--max-restarts=0 \\",
                 f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/%x-%j.out"]:
        assert line in script, line
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nodes", "2", "--gpus-per-node", "8", "--nproc-per-node", "4"], "must equal --gpus-per-node (8)"),
        (["--nodes", "1", "--nproc-per-node", "3"], "global_batch_size: 16 is not divisible by micro_batch_size x data_parallel (8 x 3)"),
        (["--time", "two hours"], "--time 'two hours' is not a SLURM time"),
        # strings with a newline would end the #SBATCH header or inject a command into the job script
        (["--job-name", "x\nrm -rf ~"], "--job-name 'x\\nrm -rf ~' contains the control character '\\n'"),
        (["--partition", "gpu\n#SBATCH --qos=top"], "--partition 'gpu\\n#SBATCH --qos=top' contains the control"),
        (["--account", "a\rb"], "--account 'a\\rb' contains the control character '\\r'"),
        (["--qos", "q\tb"], "--qos 'q\\tb' contains the control character '\\t'"),
        (["--sbatch-arg=--mem=1G\ntouch /tmp/owned"], "--sbatch-arg[0] '--mem=1G\\ntouch /tmp/owned' contains"),
        (["--sbatch-arg=exclusive"], "--sbatch-arg[0] 'exclusive' must be an sbatch option"),
    ],
)
def test_bad_launches_are_refused_before_submitting(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, "-m", "lucid_megatron", "launch", "slurm", *args, CONFIG, "--run-dir", str(tmp_path / "r"),
         "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_run_dir_with_a_newline_is_refused(tmp_path):
    run_dir = tmp_path / "run\n#SBATCH --exclusive"
    result = subprocess.run(
        [sys.executable, "-m", "lucid_megatron", "launch", "slurm", CONFIG, "--run-dir", str(run_dir), "--dry-run"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2 and "--run-dir" in result.stderr and "contains the control character '\\n'" in \
        result.stderr, result.stderr
