"""`lucid train --nproc-per-node N`: torchrun on this machine (the one way to start a local multi-process job)."""

import subprocess
import sys
from pathlib import Path

from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from tests.train.runs import train_env, train_records

REPO = Path(__file__).resolve().parents[2]


def test_train_starts_torchrun(tmp_path):
    data = tmp_path / "synth"
    write_synth_dataset(data, RetrievalTask(min_len=128, max_len=256), train_docs=200, valid_docs=8,
                        docs_per_shard=50, seed=0, tokenizer=ByteTokenizer())
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "lucid_megatron", "train", "configs/demo.yaml", "--nproc-per-node", "2",
               "--run-dir", str(run_dir)]
    for assignment in [f"data.path={data}", "train.steps=2", "train.seq_length=256", "data.eval_rows=4",
                       "logging.interval=1"]:
        command += ["--set", assignment]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=train_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2 = DP 2" in result.stdout
    assert sorted(train_records(run_dir)) == [1, 2]
