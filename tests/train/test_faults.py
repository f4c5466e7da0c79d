"""Faults a careless or hostile user runs into, each turned into a clear outcome (no hang, nothing lost)."""

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import torch

from lucid_megatron.train.metrics import MetricsLogger
from tests.distributed import run_on_ranks

from .runs import metrics, run_train, small_training_config, train_command, train_env, train_records


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # cut mid-write
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress=False, total_steps=10, start_step=3)
    logger.log(4, {"loss": 0.5})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 1 / 3},
                       {"step": 4, "loss": 0.5}]


# ---- runs of `lucid train` -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return small_training_config(tmp_path_factory.mktemp("faults"))


def _wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(train_records(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})")


def test_a_second_run_in_the_same_run_dir_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_command(config, run_dir, overrides=["train.steps=400"]), env=train_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, 1, first)
        second = run_train(config, run_dir, overrides=["train.steps=400"], resume="auto", expect_ok=False, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{run_dir} is in use by another run (pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_bad_launch_values_fail_before_any_process_starts(config, tmp_path):
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    cases = [
        (dict(nproc=0), "argument --nproc-per-node: 0 is not allowed"),
        (dict(overrides=[f"checkpoint.init_from={not_a_checkpoint}"]),
         f"checkpoint.init_from: '{not_a_checkpoint}' is not a complete checkpoint (no COMPLETE file) and holds none"),
    ]
    for kwargs, message in cases:
        result = run_train(config, tmp_path / "run", expect_ok=False, timeout=120, **kwargs)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_resuming_into_other_shapes_names_the_fields(config, tmp_path):
    run_dir = tmp_path / "run"
    run_train(config, run_dir, overrides=["train.steps=2"])
    result = run_train(config, run_dir, overrides=["train.steps=4", "model.hidden_size=96", "model.num_layers=3"],
                       resume="auto", expect_ok=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "holds a model of other shapes than the config (model.num_layers: config 3, checkpoint 2; " \
           "model.hidden_size: config 96, checkpoint 64)" in result.stderr


# ---- damaged, unsafe and poisoned checkpoints ------------------------------------------------------


class _RunsCode:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _crafted_legacy_file(path, marker):
    """Checkpoints from before optimizer/ was the only optimizer state also hold deepspeed/: still scanned."""
    path.parent.mkdir(parents=True)
    torch.save({"x": _RunsCode(f"touch {marker}")}, path)


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGES = {
    "truncated model shard": (lambda step, marker: _truncate(sorted((step / "model").glob("*.distcp"))[0]),
                              "model/__0_0.distcp is truncated"),
    "truncated optimizer file": (lambda step, marker: _truncate(sorted((step / "optimizer").glob("*.distcp"))[0]),
                                 "optimizer/__0_0.distcp is truncated"),
    "empty state.json": (lambda step, marker: (step / "state.json").write_text(""), "JSONDecodeError"),
    "crafted RNG file": (lambda step, marker: torch.save({"cpu": _RunsCode(f"touch {marker}")}, step / "rng" / "rank_0.pt"),
                         "UnpicklingError"),
    "crafted model index": (lambda step, marker: (step / "model" / ".metadata").write_bytes(
        pickle.dumps(_RunsCode(f"touch {marker}"))), ".metadata names classes outside a checkpoint index (posix.system)"),
    "crafted reshardable optimizer index": (lambda step, marker: (step / "optimizer" / ".metadata").write_bytes(
        pickle.dumps(_RunsCode(f"touch {marker}"))), "optimizer/.metadata names classes outside a checkpoint index"),
    "crafted DeepSpeed file of an earlier checkpoint format": (
        lambda step, marker: _crafted_legacy_file(step / "deepspeed" / "state" / "mp_rank_00_model_states.pt", marker),
        "names classes outside DeepSpeed's state (posix.system): refused"),
}


STEPS = len(DAMAGES) + 1  # a checkpoint at every step: step 1 intact, one damage in each later one


@pytest.fixture(scope="module")
def resumed_past_damage(config, tmp_path_factory):
    """A run with a checkpoint at every step, copied, each checkpoint after step 1 damaged in its own way, then
    resumed once with --resume auto: it must skip them all, newest first, and continue exactly from step 1.
    Returns (the undamaged run, the resumed run, its output, {damage: the file its crafted pickle would create})."""
    root = tmp_path_factory.mktemp("damaged")
    common = [f"train.steps={STEPS}", "checkpoint.interval=1", f"checkpoint.keep_last={STEPS}"]
    original, run_dir = root / "original", root / "run"
    run_train(config, original, overrides=common)
    shutil.copytree(original, run_dir)
    markers = {}
    for step, (name, (make_damage, _)) in enumerate(DAMAGES.items(), start=2):
        markers[name] = root / f"code-ran-at-step-{step}"
        make_damage(run_dir / "checkpoints" / f"step_{step:08d}", markers[name])
    result = run_train(config, run_dir, overrides=common, resume="auto")
    return original, run_dir, result, markers


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_unsafe_latest_checkpoint_is_skipped(resumed_past_damage, damage):
    original, run_dir, result, markers = resumed_past_damage
    step = list(DAMAGES).index(damage) + 2
    _, reason = DAMAGES[damage]
    prefix = f"skipping checkpoint {run_dir}/checkpoints/step_{step:08d}: rank 0: "
    skipped = [line for line in result.stdout.splitlines() if prefix in line]
    assert len(skipped) == 1 and reason in skipped[0], result.stdout[-3000:]
    assert f"resuming from {run_dir}/checkpoints/step_00000001" in result.stdout
    assert not markers[damage].exists()  # nothing in the crafted files ran
    want, got = train_records(original), train_records(run_dir)
    assert [got[s]["loss"] for s in range(2, STEPS + 1)] == [want[s]["loss"] for s in range(2, STEPS + 1)]  # exact
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"


def _rewrite_moments(rank, world_size, directory):
    """Read a checkpoint's optimizer/ whole (one gloo rank), set every first moment to 3e38 and every second
    moment to 0, and write it back the same way."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from lucid_megatron.parallel.cpu_shim import apply_cpu_shim

    apply_cpu_shim()  # Megatron's writer synchronizes CUDA around its writes
    dist.init_process_group("gloo")
    metadata = dist_checkpointing.load_tensors_metadata(directory)
    loaded = dist_checkpointing.load({k: v for k, v in metadata.items()}, directory)
    poisoned = {}
    for key, meta in metadata.items():
        value = loaded[key]
        if key.startswith("exp_avg."):
            value.fill_(3e38)
        elif key.startswith("exp_avg_sq."):
            value.zero_()
        poisoned[key] = dataclasses.replace(meta, data=value, dtype=value.dtype)
    poisoned.update(dist_checkpointing.load_common_state_dict(directory))
    rewritten = directory + ".poisoned"
    os.makedirs(rewritten)
    dist_checkpointing.save(poisoned, rewritten)
    shutil.rmtree(directory)
    os.rename(rewritten, directory)


def _explode_adam_moments(step_dir):
    """Blow up the first moments in a checkpoint: the next update overflows while its loss is finite."""
    run_on_ranks(_rewrite_moments, 1, str(step_dir / "optimizer"))


def test_non_finite_weights_stop_the_run_and_are_never_saved(config, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train.steps=6", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    run_train(config, run_dir, overrides=common + ["train.stop_at_step=2"])
    _explode_adam_moments(run_dir / "checkpoints" / "step_00000002")
    result = run_train(config, run_dir, overrides=common, resume="auto", expect_ok=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    records = train_records(run_dir)
    assert max(records) == 3 and math.isfinite(records[3]["loss"])  # the loss of the poisoning step was finite
    assert "the weights are not finite after step 3" in result.stderr
    assert f"The last good checkpoint is {run_dir}/checkpoints/step_00000002" in result.stderr
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"


# ---- hangs, signals, a full disk ----------------------------------------------------------------------


def _run_with_deadline(command, deadline_s):
    """Run a job in its own session; past the deadline kill the whole session (a hang fails, never blocks CI)."""
    proc = subprocess.Popen(command, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"hung past {deadline_s} s:\n{out[-2000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


def test_zero3_validation_with_a_rank_without_rows_does_not_hang(config, tmp_path):
    """One validation shard feeds one of two ranks; ZeRO-3 gathers weights in every forward, collectively.

    ffn_hidden_size=800 makes linear_fc1 2 x 800 x 64 = 102,400 elements, above ZeRO-3's default
    partitioning threshold (1e5), so weights are really partitioned.
    """
    run_dir = tmp_path / "run"
    code, out, err = _run_with_deadline(
        train_command(config, run_dir, nproc=2, overrides=["model.ffn_hidden_size=800", "train.zero_stage=3",
                                                           "train.steps=2", "data.eval_rows=8"]), 240)
    assert code == 0, out[-2000:] + err[-3000:]
    valid = [r for r in metrics(run_dir) if "valid_loss" in r]
    assert len(valid) == 1 and math.isfinite(valid[0]["valid_loss"])


def test_a_worker_stuck_after_sigterm_is_killed_after_the_grace_period(config, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(config, run_dir, nproc=2, overrides=["train.steps=400", "launch.stop_grace_s=5"]),
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _wait_for_step(run_dir, 1, proc)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "lucid_megatron" in " ".join(p.cmdline())
                   and "elastic_agent" not in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].suspend()  # stuck: it will never reach the next collective, nor act on SIGTERM
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "the workers did not stop within 5 s of the stop signal (launch.stop_grace_s); killing them" in err
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


@pytest.mark.parametrize("victim", ["lucid train", "torchrun"])
def test_killing_the_launcher_leaves_no_worker_behind_and_frees_the_run(config, tmp_path, victim):
    """SIGKILL of `lucid train` itself, outside SLURM: torchrun gets SIGTERM (its parent-death signal), its
    workers save a checkpoint and stop. SIGKILL of torchrun: its workers get SIGKILL (theirs). Either way
    nothing outlives the launcher and the run directory's lock is free (and with no restart allowed, the
    supervisor in `lucid train` records the failure instead of starting again)."""
    from lucid_megatron.train.run_lock import check_free

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(config, run_dir, nproc=2, overrides=["train.steps=400", "launch.max_restarts=0"]),
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, 1, proc)
        tree = psutil.Process(proc.pid).children(recursive=True)
        torchrun = [p for p in tree if "lucid_megatron.runtime.elastic_agent" in " ".join(p.cmdline())]
        assert len(torchrun) == 1 and len(tree) == 3  # torchrun and its two workers
        (proc if victim == "lucid train" else torchrun[0]).kill()  # nothing can be forwarded now
        proc.communicate(timeout=120)
        gone, alive = psutil.wait_procs(tree, timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    check_free(run_dir)  # raises RunDirBusy while any process holds the lock
    state = json.loads((run_dir / "status.json").read_text())["state"]
    if victim == "lucid train":  # saved on torchrun's SIGTERM: nothing lost
        assert state == "preempted" and (run_dir / "checkpoints" / "latest").exists()
    else:  # killed mid-step, as a node loss would: the supervisor would restart, but may not
        status = json.loads((run_dir / "status.json").read_text())
        assert state == "failed" and "launch.max_restarts=0" in status["reason"], status


def test_a_collective_timeout_names_the_rank_and_the_phase():
    messages = run_on_ranks(_miss_a_collective, 2, timeout=120)
    assert "rank 0: validation after step 7: a collective did not complete within 3 s" in messages[0]
    assert messages[1] == "skipped"


def _miss_a_collective(rank, world_size):
    from lucid_megatron.runtime import CollectiveTimeout, start_runtime

    runtime = start_runtime(1, collective_timeout_s=3)
    if rank == 1:
        time.sleep(8)  # alive, but never joins the all-reduce below
        return "skipped"
    try:
        with runtime.phase("validation after step 7"):
            runtime.any_rank(True)
    except CollectiveTimeout as err:
        return str(err)
    return "no timeout"


def test_ctrl_c_saves_and_stops(config, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(config, run_dir, overrides=["train.steps=400"]), env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGINT at step" in out and "Traceback" not in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    assert (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(config, tmp_path, background):
    """Two ranks, each writing its own ZeRO fragments: the same message whether the training processes write the
    checkpoint or forked writers do (then the failure is found when the writes are collected, on every rank,
    and the run stops without publishing it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here (needs root): {mounted.stderr.strip()}")
    try:
        run_dir = disk / "run"  # one 2.5 MB checkpoint fits, the second does not
        result = run_train(config, run_dir, nproc=2, expect_ok=False,
                           overrides=["train.steps=4", "checkpoint.interval=2", "checkpoint.keep_last=1",
                                      "train.zero_stage=1", f"checkpoint.async_save={str(background).lower()}"])
        assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"saving the checkpoint of step 4 under {run_dir}/checkpoints failed" in result.stderr
        assert "The file system is full" in result.stderr
        assert f"The previous checkpoint {run_dir}/checkpoints/step_00000002 is intact" in result.stderr
        assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    finally:
        subprocess.run(["umount", str(disk)], check=False)
