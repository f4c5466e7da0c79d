"""Small trained checkpoints (real `lucid train` runs) shared by the conversion tests."""

import subprocess
import sys

import pytest

from tests.train.runs import run_train, small_training_config


@pytest.fixture(scope="session")
def train_config(tmp_path_factory):
    return small_training_config(tmp_path_factory.mktemp("convert-data"), train_docs=200, valid_docs=8)


def _trained(tmp_path_factory, train_config, name, nproc, overrides):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    run_train(train_config, run_dir, nproc=nproc, overrides=["train.steps=3", "data.eval_rows=0", *overrides])
    return run_dir


@pytest.fixture(scope="session")
def run_tp1(tmp_path_factory, train_config):
    return _trained(tmp_path_factory, train_config, "tp1", 1, ["model.lucid_layers=all"])


@pytest.fixture(scope="session")
def run_tp2(tmp_path_factory, train_config):
    return _trained(tmp_path_factory, train_config, "tp2", 2, ["parallel.tensor_parallel_size=2",
                                                               "model.lucid_layers=every:2", "model.num_layers=4"])


@pytest.fixture(scope="session")
def run_nope_tied(tmp_path_factory, train_config):
    return _trained(tmp_path_factory, train_config, "nope", 1, ["model.position_embedding=none",
                                                               "model.tie_embeddings=true", "model.lucid_layers=[1]"])


def convert(*args, expect_ok=True):
    result = subprocess.run([sys.executable, "-m", "lucid_megatron", "convert", *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"lucid convert {args[0]} failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="session")
def exported(tmp_path_factory, run_tp1):
    out = tmp_path_factory.mktemp("hf") / "model"
    convert("to-hf", run_tp1, out)
    return out
