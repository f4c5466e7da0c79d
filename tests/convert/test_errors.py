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


def test_vocabulary_sizes_out_of_range_are_refused(run_tp1, exported):
    import pytest

    from lucid_megatron.convert import hf_io, mapping, megatron_io

    cfg = megatron_io.read_model_config(megatron_io.resolve_checkpoint(run_tp1))
    with pytest.raises(ValueError, match=r"tokenizer 'hf:big' has 300 tokens but the model has 259 "
                                         r"\(model.vocab_size\); allowed: 1..259"):
        mapping.exported_vocab_size(cfg, {"name": "hf:big", "vocab_size": 300})
    weights = load_file(str(exported / "model.safetensors"))
    with pytest.raises(ValueError, match=r"hf/config.json: vocab_size=385; allowed: 1..384 \(the model's vocabulary "
                                         r"of 259 padded to a multiple of 128\)"):
        hf_io.check_hf_weights(weights, cfg, "hf", 385)
    # an export that still carries the padding rows (written before they were trimmed) imports as it is
    padded = {k: mapping._vocab_rows(v, 384) if v.shape[0] == 259 else v for k, v in weights.items()}
    hf_io.check_hf_weights(padded, cfg, "hf", 384)
    megatron = mapping.hf_to_megatron(padded, cfg)
    assert torch.equal(megatron["output_layer.weight"], padded["lm_head.weight"])
