"""Run `lucid train` for real (subprocess; torchrun for several processes) and read what it wrote."""

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from lucid_megatron.runtime import commands

# A small run: the tiny model on a small synthetic retrieval dataset, 2 gloo processes in seconds.
BASE_CONFIG = {
    "model": {"preset": "tiny"},
    "data": {"path": None, "num_streams": 4, "num_workers": 0, "eval_rows": 8},
    "optimizer": {"lr": 3.0e-3, "weight_decay": 0.01, "grad_clip": 1.0},
    "schedule": {"warmup_fraction": 0.2, "decay": "cosine", "min_lr_ratio": 0.1},
    "train": {"steps": 5, "global_batch_size": 8, "micro_batch_size": 2, "seq_length": 64, "zero_stage": 0},
    "checkpoint": {"interval": 0, "keep_last": 2},
    "logging": {"interval": 1, "eval_interval": 0, "progress": False},
}


def small_training_config(root: Path, *, train_docs: int = 600, valid_docs: int = 40) -> Path:
    """A synthetic retrieval dataset of short documents (40-64 bytes, one validation shard) and a config for it."""
    from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
    from lucid_megatron.data.tokenizer import ByteTokenizer

    dataset = Path(root) / "synth"
    write_synth_dataset(dataset, RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1),
                        train_docs=train_docs, valid_docs=valid_docs, docs_per_shard=50, seed=0,
                        tokenizer=ByteTokenizer())
    return write_config(root, dataset)


def write_config(directory: Path, dataset: Path, name: str = "config.yaml") -> Path:
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["data"]["path"] = str(dataset)
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_command(config: Path, run_dir: Path, *, nproc: int = 1, overrides=(), resume=None) -> list[str]:
    """The `lucid train` process command (runtime/commands.py builds its arguments)."""
    return commands.process_command(commands.train_command(config, run_dir, overrides=overrides, resume=resume,
                                                           nproc_per_node=nproc))


def train_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_train(config: Path, run_dir: Path, *, nproc: int = 1, overrides=(), resume=None, timeout=600,
              expect_ok=True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        train_command(config, run_dir, nproc=nproc, overrides=overrides, resume=resume),
        capture_output=True, text=True, timeout=timeout, env=train_env(),
    )
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"lucid train failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def train_records(run_dir: Path) -> dict[int, dict]:
    """step -> the training record of that step (validation records left out)."""
    return {r["step"]: r for r in metrics(run_dir) if "loss" in r}


# Every line `lucid train` itself prints: its messages, the progress line, the validation line.
OUR_LINE = re.compile(r"^(lucid train: |step \d+/\d+ \[[#.]+\]  loss |step \d+: validation loss )")


def foreign_console_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Console lines (stdout and stderr) that `lucid train` did not write itself: library output belongs in
    RUN_DIR/logs/."""
    return [line for line in (result.stdout + result.stderr).splitlines() if line and not OUR_LINE.match(line)]
