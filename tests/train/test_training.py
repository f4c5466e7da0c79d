"""`lucid train` end to end on CPU with real gloo processes, DeepSpeed, checkpoints and TensorBoard."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer

from .runs import foreign_console_lines, run_train, train_command, train_env, train_records, write_config


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    dataset = root / "synth"
    write_synth_dataset(
        dataset, RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1),
        train_docs=600, valid_docs=40, docs_per_shard=50, seed=0, tokenizer=ByteTokenizer(),
    )
    return write_config(root, dataset)


def _losses(run_dir, steps=None):
    records = train_records(run_dir)
    return [records[s]["loss"] for s in (steps or sorted(records))]


def _assert_close(a, b, tol):
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= tol, (a, b)


# ---- equivalence of layouts -------------------------------------------------------------------


# Every layout run below has the same schedule, and saves at step 4: the equivalence tests compare their curves
# and the resharding tests resume their step-4 checkpoints at other layouts, so each run is made once. Each also
# validates every 2 steps (the TensorBoard test reads one; validation changes no training loss, bit for bit).
LAYOUT_RUN = ["train.steps=6", "checkpoint.interval=4", "logging.progress=true", "logging.eval_interval=2"]
LAYOUTS = {"dp1": (1, []), "dp2": (2, []), "tp2": (2, ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"])}


@pytest.fixture(scope="module")
def torch_extensions(tmp_path_factory):
    """Where DeepSpeed would build its C++ ops during the shared runs: it must stay empty (none is needed)."""
    return tmp_path_factory.mktemp("torch_extensions")


@pytest.fixture(scope="module")
def layout_run(config, tmp_path_factory, torch_extensions):
    """``layout_run(layout, stage)``: the finished run (and its console output) of LAYOUT_RUN at that layout and
    ZeRO stage, trained on first use and shared by every test that only reads it."""
    done = {}

    def run(layout: str, stage: int):
        if (layout, stage) not in done:
            nproc, extra = LAYOUTS[layout]
            run_dir = tmp_path_factory.mktemp(f"{layout}-zero{stage}") / "run"
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("TORCH_EXTENSIONS_DIR", str(torch_extensions))
                # ZeRO-3's runs write their checkpoints in the background: the resharding tests resume them
                background = ["checkpoint.async_save=true"] if stage == 3 else []
                result = run_train(config, run_dir, nproc=nproc,
                                   overrides=LAYOUT_RUN + [f"train.zero_stage={stage}"] + extra + background)
            done[layout, stage] = run_dir, result
        return done[layout, stage]

    return run


@pytest.fixture(scope="module")
def reference_run(layout_run):
    """DP=1, ZeRO-0, 6 steps: the curve every other layout must reproduce."""
    return layout_run("dp1", 0)[0]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_and_dp2_reproduce_dp1(layout_run, reference_run, stage):
    run_dir, _ = layout_run("dp2", stage)
    want, got = train_records(reference_run), train_records(run_dir)
    _assert_close(_losses(run_dir), _losses(reference_run), 2e-5)
    # the same rows went into every step
    assert [got[s]["data_digest"] for s in got] == [want[s]["data_digest"] for s in want]
    assert want[6]["loss"] < want[1]["loss"]


def test_tp2_reproduces_tp1(layout_run, reference_run):
    run_dir, _ = layout_run("tp2", 1)
    _assert_close(_losses(run_dir), _losses(reference_run), 2e-5)


PROFILED = {"lucid::step_3", "lucid::data", "lucid::forward", "lucid::backward", "lucid::solve",
            "lucid::solve_backward", "lucid::deepspeed_step"}
CP_PROFILED = {"a2a": {"lucid::cp_all_to_all"},
               "p2p": {"lucid::cp_ring_send_recv", "lucid::cp_ring_wait", "lucid::solve_earlier",
                       "lucid::solve_backward_earlier"}}


@pytest.mark.parametrize("mode", ["a2a", "p2p"])
def test_cp2_reproduces_cp1(config, reference_run, tmp_path, mode):
    """Context parallelism (2 ranks, zigzag split of every document) with ZeRO-1: the same loss curve. Step 3 is
    profiled (train.profile_steps): each rank's Chrome trace names our ranges, and the curve is unchanged."""
    run_dir = tmp_path / "run"
    result = run_train(config, run_dir, nproc=2, overrides=[
        "train.steps=6", "parallel.context_parallel_size=2", f"parallel.cp_comm_type={mode}", "train.zero_stage=1",
        'train.profile_steps="3-3"'])
    assert "DP 1 x CP 2 x TP 1" in result.stdout
    _assert_close(_losses(run_dir), _losses(reference_run), 2e-5)
    assert f"profile of steps 3-3 written to {run_dir / 'profile' / 'steps_3-3'}" in result.stdout
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / "steps_3-3" / f"rank_{rank}.trace.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert PROFILED | CP_PROFILED[mode] <= names, (PROFILED | CP_PROFILED[mode]) - names
        assert "lucid::step_2" not in names and "lucid::step_4" not in names


def test_context_parallel_4_as_2x2_a2a_p2p_matches_the_reference_curve(config, reference_run, tmp_path):
    """CP=4 across 4 processes as 2 head all-to-all pairs x 2 pipeline stages, ZeRO-1: the same loss curve."""
    run_dir = tmp_path / "run"
    result = run_train(config, run_dir, nproc=4, timeout=900, overrides=[
        "train.steps=6", "parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p",
        "parallel.hierarchical_context_parallel_sizes=[2, 2]", "train.zero_stage=1"])
    assert "DP 1 x CP 4 x TP 1" in result.stdout
    _assert_close(_losses(run_dir), _losses(reference_run), 2e-5)


# ---- resume, preemption, kills ------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(layout_run):
    """The uninterrupted DP=2 ZeRO-1 run the stopped runs below must continue exactly: the layout run of the
    equivalence tests (its checkpoints and progress lines change no loss)."""
    return layout_run("dp2", 1)[0]


RESUMED = ["train.steps=6", "train.zero_stage=1"]  # LAYOUT_RUN's schedule, at the uninterrupted run's layout


def test_resume_is_bit_exact(config, uninterrupted, tmp_path):
    """Stopped at step 3 with a checkpoint written in the background (the run waits for it before exiting), then
    resumed: the uninterrupted run's losses, bit for bit."""
    run_dir = tmp_path / "run"
    stopped = run_train(config, run_dir, nproc=2, overrides=RESUMED + ["train.stop_at_step=3", "checkpoint.async_save=true"])
    assert "step 3: writing step_00000003 in the background" in stopped.stdout
    assert re.search(r"step 3: waited \d+\.\d+ s for step_00000003 to be written before exiting", stopped.stdout)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    assert max(train_records(run_dir)) == 3
    run_train(config, run_dir, nproc=2, overrides=RESUMED, resume="auto")
    want, got = train_records(uninterrupted), train_records(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert [got[s]["loss"] for s in range(4, 7)] == [want[s]["loss"] for s in range(4, 7)]  # bit-identical
    assert [got[s]["data_digest"] for s in range(1, 7)] == [want[s]["data_digest"] for s in range(1, 7)]


def test_sigterm_saves_and_resumes_exactly(config, uninterrupted, tmp_path):
    """SIGTERM while checkpoints are written in the background after every step: the run saves its last step,
    waits for every write, exits 0, and resumes exactly."""
    run_dir = tmp_path / "run"
    background = ["checkpoint.async_save=true", "checkpoint.interval=1"]
    proc = subprocess.Popen(train_command(config, run_dir, nproc=2, overrides=RESUMED + background), env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and train_records(run_dir) and max(train_records(run_dir)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 2 <= stopped_at < 6
    assert "waited" in out and not list((run_dir / "checkpoints").glob("*.partial"))
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()
    run_train(config, run_dir, nproc=2, overrides=RESUMED, resume="auto")
    want, got = train_records(uninterrupted), train_records(run_dir)
    assert [got[s]["loss"] for s in range(1, 7)] == [want[s]["loss"] for s in range(1, 7)]
    assert [got[s]["data_digest"] for s in range(1, 7)] == [want[s]["data_digest"] for s in range(1, 7)]


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_sigkill_during_save_keeps_previous_checkpoint(config, tmp_path, background):
    """Kill the whole job while step 4's checkpoint is being written (by the training processes, or in the
    background by their forked writers): step 2's stays the one to use."""
    run_dir = tmp_path / "run"
    bigger = ["model.hidden_size=256", "model.ffn_hidden_size=704", "model.num_layers=4",
              "train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=3", "train.zero_stage=1",
              f"checkpoint.async_save={str(background).lower()}"]
    proc = subprocess.Popen(train_command(config, run_dir, nproc=2, overrides=bigger), env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = run_dir / "checkpoints" / "step_00000004.partial"
    deadline = time.monotonic() + 300
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert partial.exists(), "the save of step 4 never started"
    # The whole job: torchrun starts each worker in a session of its own, so the launcher's process group
    # does not reach them; kill every process of the tree at once, and wait until all are gone.
    job = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for process in job:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(job, timeout=60)
    assert not alive, f"processes of the killed job still alive: {alive}"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    assert len(list((run_dir / "checkpoints").glob("*.partial"))) == 1  # at most one save in flight
    run_train(config, run_dir, nproc=2, overrides=bigger, resume="auto")
    records = train_records(run_dir)
    assert sorted(records) == list(range(1, 9))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"
    assert not partial.exists()


# ---- resharding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "saved,loaded,stage",
    [("dp2", "dp1", 1), ("dp2", "dp1", 2), ("dp2", "dp1", 3), ("tp2", "dp1", 1), ("tp2", "dp1", 2), ("tp2", "dp1", 3),
     ("tp2", "dp1", 0), ("dp1", "dp2", 2)],
)
def test_resharded_resume_continues_with_the_adam_state(config, layout_run, torch_extensions, tmp_path, monkeypatch,
                                                         saved, loaded, stage):
    """Saved at one layout (step 4 of 6), resumed at another: steps 5 and 6 give the un-resharded
    continuation's losses within 1e-5.  Step 5's loss only needs the weights; step 6's needs AdamW's moments
    and step count after the update of step 5 (restarting them moves it by about 1e-2 here).

    The same runs check the console: only our own lines, the library warnings in RUN_DIR/logs (ZeRO-3's
    deprecated collective once per process, not once per step; Megatron's CUDA_DEVICE_MAX_CONNECTIONS hint
    under TP + SP; the ShardedTensor notices of the resharded load), and no DeepSpeed op built."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(torch_extensions))
    (save_nproc, _), (load_nproc, load_layout) = LAYOUTS[saved], LAYOUTS[loaded]
    continued, first = layout_run(saved, stage)  # the uninterrupted run, shared with the equivalence tests
    resumed = tmp_path / "resumed"
    result = run_train(config, resumed, nproc=load_nproc,
                       overrides=LAYOUT_RUN + [f"train.zero_stage={stage}"] + load_layout,
                       resume=str(continued / "checkpoints" / "step_00000004"))
    assert "AdamW state (4 updates) resharded" in result.stdout
    want, got = train_records(continued), train_records(resumed)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert abs(got[step]["loss"] - want[step]["loss"]) < 1e-5, (step, got[step]["loss"], want[step]["loss"])
    assert [got[s]["data_digest"] for s in (5, 6)] == [want[s]["data_digest"] for s in (5, 6)]

    assert foreign_console_lines(first) == [] and foreign_console_lines(result) == []
    assert len(re.findall(r"^step \d/6 \[", first.stdout, re.M)) == 6  # progress is ours: still shown
    saved_logs = {p.name: p.read_text() for p in (continued / "logs").iterdir()}
    # launcher.log appears only if the launcher had a library record to log (it imports neither Megatron nor
    # DeepSpeed), and never for a run trained in-process
    assert sorted(set(saved_logs) - {"launcher.log"}) == [f"rank_{r}.log" for r in range(save_nproc)]
    assert "launcher.log" not in saved_logs or save_nproc > 1
    assert "Transformer Engine and Apex are not installed" in saved_logs["rank_0.log"]
    if stage == 3 and saved == "dp2":
        for rank in ("rank_0.log", "rank_1.log"):
            assert saved_logs[rank].count("FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated") == 1
    if saved == "tp2":
        assert "CUDA_DEVICE_MAX_CONNECTIONS" in saved_logs["rank_0.log"]
    assert "deprecating ShardedTensor" in (resumed / "logs" / "rank_0.log").read_text()
    assert not torch_extensions.exists() or not any(torch_extensions.iterdir())


# ---- logging, faults, validation --------------------------------------------------------------


def test_tensorboard_events_hold_the_scalars(layout_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = layout_run("dp2", 2)  # DP=2, ZeRO-2, 6 steps, validation every 2 steps
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "valid/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
                "perf/memory_gib", "layout/zero_stage", "layout/world_size", "layout/data_parallel",
                "layout/tensor_parallel", "layout/context_parallel", "perf/tflops_per_gpu", "perf/hardware_tflops_per_gpu",
                "perf/tokens_per_s_per_gpu", "perf/rank_time/slowest_s", "perf/time/compute_s", "perf/time/evaluation_s"}
    assert expected <= tags, expected - tags
    for record in train_records(run_dir).values():  # logged every step: the interval is that step
        assert record["tokens_per_s_per_gpu"] == record["tokens_per_s"] / 2
        assert 0 < record["tflops_per_gpu"] < record["hardware_tflops_per_gpu"] and "mfu" not in record  # CPU
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx(_losses(run_dir), rel=1e-6)  # TensorBoard stores float32
    assert [e.step for e in events.Scalars("valid/loss")] == [2, 4, 6]
    assert events.Scalars("layout/zero_stage")[0].value == 2
    assert events.Scalars("layout/data_parallel")[0].value == 2


def test_nonfinite_losses_are_skipped_then_stop_the_run(config, tmp_path):
    run_dir = tmp_path / "run"
    result = run_train(
        config, run_dir, overrides=["train.steps=40", "model.init_std=1.0e+38", "optimizer.grad_clip=0",
                                    "schedule.warmup_fraction=0", "train.max_nonfinite_steps=3"],
        expect_ok=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite for 3 consecutive steps" in result.stderr
    records = train_records(run_dir)
    skipped = [s for s, r in records.items() if r["skipped"]]
    assert len(skipped) >= 3 and records[max(records)]["nonfinite_steps"] >= 3


def test_invalid_configs_fail_before_any_process_starts(config, tmp_path):
    cases = [
        (["parallel.tensor_parallel_size=3"], "not divisible by tensor_parallel_size (3)"),
        (["train.global_batch_size=6"], "global_batch_size: 6 is not divisible by micro_batch_size x data_parallel (2 x 2)"),
        (["data.path=" + str(tmp_path / "nowhere")], "has no manifest.json and data.synth is not set"),
        (["train.bogus=1"], "train.bogus: unknown key"),
    ]
    for overrides, message in cases:
        started = time.monotonic()
        result = run_train(config, tmp_path / "run", nproc=2, overrides=overrides, expect_ok=False, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "torch.distributed" not in result.stderr and "DeepSpeed" not in result.stdout
        assert time.monotonic() - started < 60
        assert not (tmp_path / "run").exists()


def test_existing_run_dir_needs_resume(config, reference_run):
    result = run_train(config, reference_run, overrides=["train.steps=6"], expect_ok=False, timeout=120)
    assert result.returncode == 2 and "already has checkpoints; pass --resume auto" in result.stderr


# ---- precision and layer spec -------------------------------------------------------------------


def test_bf16_on_cpu_follows_the_fp32_curve(config, reference_run, tmp_path):
    """train.precision=bf16 runs on CPU (DeepSpeed bf16, fp32 master weights): close to fp32, not equal."""
    run_dir = tmp_path / "run"
    result = run_train(config, run_dir, overrides=["train.steps=6", "train.precision=bf16", "train.zero_stage=1"])
    assert ", cpu, bfloat16, local layers" in result.stdout
    got, want = _losses(run_dir), _losses(reference_run)  # the reference is fp32, ZeRO-0 (== ZeRO-1 to 3e-7)
    relative = [abs(a - b) / b for a, b in zip(got, want)]
    # bf16 rounding moves every step a little (2e-4 over these 6 steps, 4e-4 over 30 measured); a bf16
    # run equal to fp32 would mean bf16 never engaged
    assert 0 < max(relative) < 5e-3, relative


def test_te_spec_without_transformer_engine_fails_before_any_process_starts(config, tmp_path):
    from lucid_megatron.model.specs import transformer_engine_import_error

    if transformer_engine_import_error() is None:
        pytest.skip("Transformer Engine is importable on this machine: the te spec is allowed here")
    started = time.monotonic()
    result = run_train(config, tmp_path / "run", nproc=2, overrides=["model.spec=te"], expect_ok=False, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "model.spec=te needs Transformer Engine" in result.stderr
    assert "pip install --no-build-isolation 'transformer-engine[pytorch]'" in result.stderr
    assert "torch.distributed" not in result.stderr and not (tmp_path / "run").exists()
    assert time.monotonic() - started < 60


# ---- checkpoints written by earlier versions ----------------------------------------------------

LEGACY = Path(__file__).parent / "fixtures" / "checkpoint-with-deepspeed-dir"


def test_a_checkpoint_of_the_earlier_format_resumes(config, tmp_path):
    """Step 2 of a DP=2 ZeRO-1 run saved by the code before optimizer/ was the only optimizer state (it also
    holds deepspeed/, and optimizer/ as whole tensor-parallel-local tensors), kept as a fixture with that run's
    losses of steps 3 and 4: resumed by today's code, the continuation gives those losses."""
    recorded = json.loads((LEGACY / "run.json").read_text())
    run_dir = tmp_path / "run"
    shutil.copytree(LEGACY / "step_00000002", run_dir / "checkpoints" / "step_00000002")
    result = run_train(config, run_dir, nproc=2, overrides=recorded["overrides"], resume="auto")
    assert "step_00000002: optimizer and RNG state restored" in result.stdout
    got = train_records(run_dir)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step]["loss"] == pytest.approx(recorded["losses"][str(step)], rel=1e-6, abs=0), step
        assert got[step]["data_digest"] == recorded["digests"][str(step)]
    assert not (run_dir / "checkpoints" / "step_00000004" / "deepspeed").exists()  # written in today's format
