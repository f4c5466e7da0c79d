"""``final_eval``: after a run reaches its last step, score retrieval on the final checkpoint.

Runs ``lucid eval niah`` (the same command a user would type, so the numbers are the same) on rank 0 as a
child process of one: the training's process group is gone by then and the other ranks have exited.  Writes
RUN_DIR/eval/niah.json (the command's results plus the chance levels) and RUN_DIR/eval/niah.png, and prints
exact match beside chance by length.  A run that stopped early (stop_at_step, a signal) is not evaluated.

A preemption signal during the evaluation (SLURM's warning SIGUSR1, or SIGTERM) stops it and marks the run
``preempted`` at its last step, so a job script requeues it and the resumed run, with nothing left to train,
evaluates; Ctrl-C stops it and says the command that evaluates the finished run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lucid_megatron import atomic
from lucid_megatron.config.model import parse_lucid_layers
from lucid_megatron.config.train import TrainConfig
from lucid_megatron.data.synth import RetrievalTask
from lucid_megatron.runtime.commands import NiahOptions, niah_command, process_command, shell_text

from .signals import PreemptionFlag
from .status import read_status, write_status

# torchrun's variables: without them the child is a world of one on this rank's device (LOCAL_RANK 0 -> cuda:0).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def _say(text: str) -> None:
    print(f"lucid train: final_eval: {text}", flush=True)


def chance(task: RetrievalTask) -> dict:
    """Scores without retrieval: guessing the value's digits uniformly (exact match and answer loss, the
    plateau of a model that knows only that digits come next); with several keys also copying the value of
    a key picked at random (right only when it picks the asked one)."""
    odds = {"guess_value": float(task.value_vocab) ** -task.value_len, "guess_answer_loss": math.log(task.value_vocab)}
    if task.num_needles > 1:
        odds["random_key_value"] = 1.0 / task.num_needles
    return odds


def model_label(cfg: TrainConfig) -> str:
    layers = parse_lucid_layers(cfg.model.lucid_layers, cfg.model.num_layers)
    return "LUCID" if all(layers) else "softmax" if not any(layers) else "LUCID+softmax"


def niah_arguments(cfg: TrainConfig, checkpoint: Path, out: Path, plot: Path) -> list[str]:
    """The ``lucid eval niah`` arguments that score ``checkpoint`` as the final_eval section says."""
    fe = cfg.final_eval
    options = NiahOptions.of_task(cfg.final_eval_task(), fe.lengths, num_samples=fe.num_samples,
                                  batch_size=fe.batch_size, seed=fe.seed)
    return niah_command(options, checkpoints=[checkpoint], labels=[model_label(cfg)], out=out, plot=plot)


def finished_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint of the run's last step if the run finished (status.json), else None."""
    from lucid_megatron.checkpoint import Checkpointer

    status = read_status(run_dir) or {}
    if status.get("state") != "finished" or status.get("step", 0) < cfg.train.steps:
        return None
    path = Checkpointer(run_dir / "checkpoints").step_dir(status["step"])
    return path if (path / "COMPLETE").exists() else None


def _run_child(arguments: list[str], preemption: PreemptionFlag) -> subprocess.CompletedProcess | None:
    """``python -m lucid_megatron ARGUMENTS`` as a world of one; None, with the child killed (no orphan),
    once ``preemption`` has received a signal."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    if preemption.received:
        return None
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:  # no pipe to drain
        child = subprocess.Popen(process_command(arguments), env=env, text=True, stdout=stdout, stderr=stderr)
        try:
            while child.poll() is None and not preemption.received:
                time.sleep(0.1)
        finally:  # also on the second Ctrl-C (KeyboardInterrupt)
            if child.poll() is None:
                child.kill()
                child.wait()
        if preemption.received:  # the child may have died of the same signal first: the signal decides
            return None
        stdout.seek(0), stderr.seek(0)
        return subprocess.CompletedProcess(child.args, child.returncode, stdout.read(), stderr.read())


def table(results: dict, label: str, odds: dict, needles: int) -> str:
    """Length, exact match and answer loss of ``label``, and the chance levels, one row per length."""
    guess_loss = f"answer loss (guess {odds['guess_answer_loss']:.3f})"
    columns = ["length", f"{label} exact match", guess_loss, "chance: guess"]
    columns += [f"chance: 1 of {needles} keys"] if "random_key_value" in odds else []
    widths = [max(len(c), 6) for c in columns]
    rows = [columns] + [[length, f"{r['exact_match']:.3f}", f"{r['answer_loss']:.3f} nats"]
                        + [f"{odds[k]:.4g}" for k in ("guess_value", "random_key_value") if k in odds]
                        for length, r in results["models"][label].items()]
    return "\n".join("lucid train: " + "  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths)) for row in rows)


def run_final_eval(cfg: TrainConfig, run_dir: str | Path, preemption: PreemptionFlag) -> int:
    """After ``run_training`` returned 0: evaluate if configured, on rank 0, and the run finished.  Returns
    the exit code (0 also when there is nothing to do, and when preempted: the resumed run evaluates).
    ``preemption`` is the flag the training held (signals since its last step count)."""
    run_dir = Path(run_dir)
    if cfg.final_eval is None or int(os.environ.get("RANK", "0")) != 0:
        return 0
    checkpoint = finished_checkpoint(cfg, run_dir)
    if checkpoint is None:
        return 0  # stopped before the last step: evaluated when a resumed run finishes
    import gc

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()  # the trainer's tensors (reference cycles included), then the cache: the child needs the GPU
        torch.cuda.empty_cache()

    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    out, plot = out_dir / "niah.json", out_dir / "niah.png"
    task, label = cfg.final_eval_task(), model_label(cfg)
    _say(f"retrieval on {checkpoint} ({task.num_queries} of {task.num_needles} keys asked, "
         f"{cfg.final_eval.num_samples} documents per length)")
    started = time.perf_counter()
    arguments = niah_arguments(cfg, checkpoint, out, plot)
    command = shell_text(arguments)
    result = _run_child(arguments, preemption)
    if result is None and preemption.received == "SIGINT":
        _say(f"stopped by Ctrl-C; the training finished (checkpoint {checkpoint}); evaluate it with: {command}")
        return 1
    if result is None:
        write_status(run_dir, "preempted", cfg.train.steps)  # a job script requeues; the resumed run evaluates
        _say(f"received {preemption.received} during the evaluation: stopped it. The training finished "
             f"(checkpoint {checkpoint}); a resumed run (--resume auto, as a requeued job does) evaluates it, "
             f"as does: {command}")
        return 0
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr, flush=True)
        _say(f"`lucid eval niah` failed (exit {result.returncode}); the training finished (checkpoint "
             f"{checkpoint}); retry with: {command}")
        return 1
    results = json.loads(out.read_text())
    odds = chance(task)
    results.update(chance=odds, checkpoint=str(checkpoint))
    atomic.write_text(out, json.dumps(results, indent=1))
    print(table(results, label, odds, task.num_needles), flush=True)
    _say(f"plot {plot}, numbers {out} ({time.perf_counter() - started:.0f} s)")
    return 0
