"""Malformed inputs fail with a message naming the file or the tensor."""

import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from .conftest import convert


def test_missing_checkpoint_files(run_tp1, tmp_path):
    result = convert("to-hf", tmp_path / "nowhere", tmp_path / "hf", expect_ok=False)
    assert result.returncode == 2 and "nowhere' does not exist" in result.stderr
    broken = tmp_path / "ckpt"
    shutil.copytree(next((run_tp1 / "checkpoints").glob("step_*")), broken)
    (broken / "model.yaml").unlink()
    result = convert("to-hf", broken, tmp_path / "hf", expect_ok=False)
    assert result.returncode == 2 and f"{broken / 'model.yaml'} is missing" in result.stderr


def test_missing_weights_and_wrong_shapes(exported, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    weights = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    result = convert("from-hf", hf, tmp_path / "a", expect_ok=False)
    assert result.returncode == 2 and "no model.safetensors or model.safetensors.index.json" in result.stderr
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(weights, str(hf / "model.safetensors"))
    result = convert("from-hf", hf, tmp_path / "b", expect_ok=False)
    assert result.returncode == 2
    assert "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (3, 64), expected (32, 64)" in result.stderr
    del weights["model.norm.weight"]
    save_file(weights, str(hf / "model.safetensors"))
    result = convert("from-hf", hf, tmp_path / "c", expect_ok=False)
    assert "missing tensor 'model.norm.weight'" in result.stderr


def test_unknown_architecture(exported, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "gpt2"
    (hf / "config.json").write_text(json.dumps(config))
    result = convert("from-hf", hf, tmp_path / "ckpt", expect_ok=False)
    assert result.returncode == 2
    assert "config.json: model_type 'gpt2' is not supported; allowed: lucid, llama" in result.stderr


def test_output_directory_is_never_overwritten(run_tp1, exported, tmp_path):
    result = convert("to-hf", run_tp1, exported, expect_ok=False)
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
