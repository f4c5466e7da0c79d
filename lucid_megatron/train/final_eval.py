"""``final_eval``: after a run reaches its last step, score retrieval on the final checkpoint.

Runs ``lucid eval niah`` (the same command a user would type, so the numbers are the same) on rank 0 as a
child process of one: the training's process group is gone by then and the other ranks have exited.  Writes
RUN_DIR/eval/niah.json (the command's results plus the chance levels) and RUN_DIR/eval/niah.png, and prints
exact match beside chance by length.  A run that stopped early (stop_at_step, a signal) is not evaluated.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from lucid_megatron import atomic
from lucid_megatron.config.model import parse_lucid_layers
from lucid_megatron.config.train import TrainConfig
from lucid_megatron.data.synth import RetrievalTask

# torchrun's variables: without them the child is a world of one on this rank's device (LOCAL_RANK 0 -> cuda:0).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
    fe, task = cfg.final_eval, cfg.final_eval_task()
    return ["eval", "niah", "--checkpoint", str(checkpoint), "--label", model_label(cfg),
            "--lengths", *map(str, fe.lengths), "--needles", str(task.num_needles),
            "--queries", str(task.num_queries), "--updates", str(task.updates), "--key-len", str(task.key_len),
            "--value-len", str(task.value_len), "--key-vocab", str(task.key_vocab),
            "--value-vocab", str(task.value_vocab), "--template", task.template,
            "--filler-words", str(task.filler_words), "--num-samples", str(fe.num_samples),
            "--batch-size", str(fe.batch_size), "--seed", str(fe.seed), "--out", str(out), "--plot", str(plot)]


def finished_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint of the run's last step if the run finished (status.json), else None."""
    from lucid_megatron.checkpoint import Checkpointer

    try:
        status = json.loads((run_dir / "status.json").read_text())
    except FileNotFoundError:
        return None
    if status.get("state") != "finished" or status.get("step", 0) < cfg.train.steps:
        return None
    path = Checkpointer(run_dir / "checkpoints").step_dir(status["step"])
    return path if (path / "COMPLETE").exists() else None


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def _run_child(arguments: list[str]) -> subprocess.CompletedProcess:
    """``python -m lucid_megatron ARGUMENTS`` as a world of one; a stop signal stops it too (no orphan)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")}
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-m", "lucid_megatron", *arguments], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = child.communicate()
        return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    except _Stopped:
        if child is not None:
            child.kill()
            child.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def run_final_eval(cfg: TrainConfig, run_dir: str | Path) -> int:
    """After ``run_training`` returned 0: evaluate if configured, on rank 0, and the run finished.  Returns
    the exit code (0 also when there is nothing to do)."""
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
    command = shlex.join(["lucid", *arguments])
    try:
        result = _run_child(arguments)
    except _Stopped as signal_name:
        _say(f"stopped by {signal_name}; the training finished (checkpoint {checkpoint}); evaluate it with: {command}")
        return 1
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
