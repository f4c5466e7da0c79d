"""`lucid train` on a mixture of two datasets: a DP=2 run stopped and resumed gives the uninterrupted DP=2 run's
losses bit for bit, both read the rows a DP=1 loader reads, and the per-source metrics and messages appear."""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from lucid_megatron.data import read_manifest
from lucid_megatron.data.loader import make_train_loader
from lucid_megatron.data.mixture import open_mixture
from lucid_megatron.data.streams import Upsample
from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer

from .runs import BASE_CONFIG, metrics, run_train, train_env, train_records

STEPS, SEED = 6, 1234
COMMON = [f"train.steps={STEPS}", "train.zero_stage=1"]  # as tests/train/test_training.py's exact resume
LONG = 56  # tokens: the books' documents of 56..64 tokens are read twice per epoch


@pytest.fixture(scope="module")
def mixture_config(tmp_path_factory):
    """Two synthetic sources: web (12 shards) and a small one, books (4 shards of 1 document: one per stream),
    which runs out within the run and starts its next epoch."""
    root = tmp_path_factory.mktemp("mixture")
    task = RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1)
    write_synth_dataset(root / "web", task, train_docs=600, valid_docs=20, docs_per_shard=50, seed=0,
                        tokenizer=ByteTokenizer())
    write_synth_dataset(root / "books", task, train_docs=4, valid_docs=8, docs_per_shard=1, seed=1,
                        tokenizer=ByteTokenizer())
    cfg = json.loads(json.dumps(BASE_CONFIG))
    del cfg["data"]["path"]
    cfg["data"]["sources"] = [
        {"path": str(root / "web"), "weight": 0.6},
        {"path": str(root / "books"), "weight": 0.4, "upsample": {"min_tokens": LONG, "factor": 2}},
    ]
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root


@pytest.fixture(scope="module")
def uninterrupted(mixture_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    result = run_train(mixture_config[0], run_dir, nproc=2, overrides=COMMON)
    return run_dir, result


def dp1_digests(root) -> list[int]:
    """Each step's rows_digest as one DP=1 loader reads the mixture (the rows every layout must read)."""
    mix = open_mixture([("web", root / "web", 0.6, None), ("books", root / "books", 0.4, Upsample(LONG, 2))])
    batch = BASE_CONFIG["train"]
    loader = make_train_loader(mix, seq_length=batch["seq_length"], micro_batch_size=batch["micro_batch_size"],
                               dp_rank=0, dp_size=1, num_streams=4, num_workers=0, seed=SEED)
    per_step = batch["global_batch_size"] // batch["micro_batch_size"]
    digests = []
    for _ in range(STEPS):
        rows = [row for _ in range(per_step) for row in next(loader).tokens.reshape(-1, batch["seq_length"])]
        digests.append(sum(zlib.crc32(row.numpy().tobytes()) for row in rows))
    return digests


def test_stop_and_resume_mid_mixture_is_bit_exact_and_reads_the_dp1_rows(mixture_config, uninterrupted, tmp_path):
    config, root = mixture_config
    whole, whole_result = uninterrupted
    run_dir = tmp_path / "run"
    run_train(config, run_dir, nproc=2, overrides=[*COMMON, "train.stop_at_step=3"])
    run_train(config, run_dir, nproc=2, overrides=COMMON, resume="auto")
    want, got = train_records(whole), train_records(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    steps = range(1, STEPS + 1)
    assert [got[s]["loss"] for s in steps] == [want[s]["loss"] for s in steps]  # bit-identical
    assert [got[s]["data_digest"] for s in steps] == [want[s]["data_digest"] for s in steps] == dp1_digests(root)
    # Per-source counts continue from the checkpoint's stream states, exactly.
    for s in steps:
        for key in ("tokens/web", "tokens/books", "long_share/books"):
            assert got[s][key] == want[s][key], (s, key)


def test_per_source_metrics_and_the_epoch_message(uninterrupted):
    run_dir, result = uninterrupted
    records = train_records(run_dir)
    last = records[STEPS]
    tokens = last["tokens/web"] + last["tokens/books"]
    assert 0 < tokens <= STEPS * 8 * 64 and last["tokens/books"] > 0
    assert last["share/web"] + last["share/books"] == pytest.approx(1.0)
    assert 0 < last["long_share/books"] < 1 and "long_share/web" not in last
    assert all(records[s]["tokens/web"] <= records[s + 1]["tokens/web"] for s in range(1, STEPS))
    valid = [r for r in metrics(run_dir) if "valid_loss" in r][-1]
    assert {"valid_loss/web", "valid_loss/books"} <= set(valid)
    mean = 0.6 * valid["valid_loss/web"] + 0.4 * valid["valid_loss/books"]
    assert valid["valid_loss"] == pytest.approx(mean)
    assert "source 'books' ran out of documents and started epoch 1" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for key, tag in (("tokens/web", "data/tokens/web"), ("tokens/books", "data/tokens/books"),
                     ("share/books", "data/share/books"), ("long_share/books", "data/long_share/books")):
        assert [(e.step, e.value) for e in events.Scalars(tag)] == \
            [(s, pytest.approx(records[s][key], rel=1e-6)) for s in sorted(records)], tag  # float32 in TensorBoard
    assert events.Scalars("valid/loss/web")[-1].value == pytest.approx(valid["valid_loss/web"], rel=1e-6)


def _example_block(text: str, heading: str) -> str:
    """The first ```bash block after ``heading``."""
    after = text[text.index(heading):]
    start = after.index("```bash\n") + len("```bash\n")
    return after[start:after.index("```\n", start)]


def test_the_worked_example_runs_as_documented(tmp_path):
    """README "Your own text" = docs/data.md's worked example, pasted into a shell at a repository root:
    two formats prepared with two workers, a 70/30 mixture with upsampling, 60 CPU steps."""
    repo = Path(__file__).resolve().parents[2]
    script = _example_block((repo / "README.md").read_text(), "## Your own text")
    assert script == _example_block((repo / "docs" / "data.md").read_text(), "### Worked example: two sources")
    (tmp_path / "configs").symlink_to(repo / "configs")  # "from the repository root", its data written here
    env = dict(train_env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    web, books = read_manifest(tmp_path / "data" / "web"), read_manifest(tmp_path / "data" / "books")
    assert web.source["documents_read"] == 4000 and books.source["documents_read"] == 40
    assert len(books.split("train").shards) >= 4  # one per stream at least
    records = [r for r in metrics(tmp_path / "runs" / "demo-mix") if "loss" in r]
    last = records[-1]
    assert last["step"] == 60 and last["share/web"] + last["share/books"] == pytest.approx(1.0)
    assert 0.5 < last["long_share/books"] <= 1.0 and records[-1]["loss"] < records[0]["loss"]
    assert "mix web " in result.stdout and "long-doc tokens books " in result.stdout
