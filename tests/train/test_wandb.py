"""logging.wandb: a real `lucid train` run logging to an offline W&B run, read back from W&B's own run file;
a resume continuing the same W&B run; a config asking for W&B refused up front where wandb does not import."""

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lucid_megatron.train.wandb_logger import NOT_INSTALLED

from .runs import metrics, run_train, small_training_config, train_command, train_env, write_config

WANDB = ["logging.wandb.project=lucid-test", "logging.wandb.mode=offline"]
# Steps 1-4, stopped (and saved) there, then resumed for steps 5-6: the LR schedule is the same in both.
FIRST = ["train.steps=6", "train.stop_at_step=4", *WANDB]
SECOND = ["train.steps=6", *WANDB]


def read_wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (run-ID.wandb): W&B's protobuf Records in a LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of chunks, each with a CRC-32, its length and its type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: a damaged chunk at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(records) -> dict[int, dict]:
    """step -> {tag: value} over every history record (rows of one step merged)."""
    rows = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def run_config(records) -> dict:
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in run.config.update}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir, "wandb").glob("offline-run-*"))


def test_an_offline_wandb_run_gets_the_tensorboard_scalars_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    config, run_dir = small_training_config(tmp_path, train_docs=200, valid_docs=16), tmp_path / "run"

    run_train(config, run_dir, overrides=FIRST)
    run_id = (run_dir / "wandb" / "run_id").read_text()
    (first,) = offline_runs(run_dir)
    assert first.name.endswith("-" + run_id.strip())
    records = read_wandb_records(first / f"run-{run_id.strip()}.wandb")
    logged = history(records)
    trained = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert sorted(trained) == [1, 2, 3, 4]
    for step, record in trained.items():
        assert logged[step]["train/loss"] == record["loss"]  # exactly: the same float, through JSON both ways
        assert logged[step]["train/lr"] == record["lr"]
    assert logged[0]["layout/world_size"] == 1
    config_logged = run_config(records)
    assert config_logged["run_dir"] == str(run_dir.resolve())
    assert config_logged["train"]["steps"] == 6 and config_logged["logging"]["wandb"]["project"] == "lucid-test"

    run_train(config, run_dir, overrides=SECOND, resume="auto")
    assert (run_dir / "wandb" / "run_id").read_text() == run_id
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(path.name.endswith("-" + run_id.strip()) for path in runs)
    (second,) = [path for path in runs if path != first]
    logged = history(read_wandb_records(second / f"run-{run_id.strip()}.wandb"))
    trained = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    assert sorted(trained) == [1, 2, 3, 4, 5, 6]
    assert {step: logged[step]["train/loss"] for step in (5, 6)} == {step: trained[step]["loss"] for step in (5, 6)}
    (valid,) = [r for r in metrics(run_dir) if "valid_loss" in r]
    assert logged[valid["step"]]["valid/loss"] == valid["valid_loss"]


def test_a_config_asking_for_wandb_is_refused_before_anything_starts_when_wandb_does_not_import(tmp_path):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no wandb here (a test)')\n")
    config, run_dir = write_config(tmp_path, tmp_path / "no-dataset"), tmp_path / "run"
    env = train_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(fake.parent), env.get("PYTHONPATH")]))
    result = subprocess.run(train_command(config, run_dir, overrides=WANDB), capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"lucid train: error: {NOT_INSTALLED}" in result.stderr
    assert not run_dir.exists()
