"""The README's main job, `lucid train configs/demo.yaml`, as a CI smoke run (few steps, small data): 2
processes through torchrun, checkpoints, TensorBoard, and the final retrieval evaluation."""

import json
import subprocess
from pathlib import Path

from lucid_megatron.runtime.commands import process_command, train_command

from .runs import train_env, train_records

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_runs(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["train.steps=6", "data.path=" + str(tmp_path / "data"), "data.synth.train_docs=400",
                 "data.synth.valid_docs=16", "data.synth.docs_per_shard=50", "data.eval_rows=8",
                 "logging.interval=2", "checkpoint.interval=3", "final_eval.num_samples=4"]
    command = process_command(train_command("configs/demo.yaml", run_dir, overrides=overrides))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, env=train_env())
    assert result.returncode == 0, result.stderr[-5000:]
    assert "world 2 = DP 2 x CP 1 x TP 1" in result.stdout  # the demo runs 2 processes
    assert f"checkpoint {run_dir}/checkpoints/step_00000006" in result.stdout
    assert "tensorboard --logdir" in result.stdout
    losses = [r["loss"] for r in train_records(run_dir).values()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (run_dir / "config.yaml").exists() and list((run_dir / "tensorboard").iterdir())
    # it ends with the retrieval evaluation of the final checkpoint (rank 0 of the 2 processes runs it)
    scores = json.loads((run_dir / "eval" / "niah.json").read_text())
    assert scores["checkpoint"] == str(run_dir / "checkpoints" / "step_00000006")
    assert f"lucid train: final_eval: plot {run_dir}/eval/niah.png" in result.stdout
