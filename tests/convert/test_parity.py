"""Exported Hugging Face models reproduce the Megatron model's logits (float32, CPU)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lucid_megatron.convert import megatron_io

from .conftest import convert


def _logits_both(run_dir, hf_dir, seed=0):
    checkpoint = megatron_io.resolve_checkpoint(run_dir)
    cfg = megatron_io.read_model_config(checkpoint)
    tokens = torch.randint(0, cfg.vocab_size, (3, 57), generator=torch.Generator().manual_seed(seed))
    with megatron_io.single_process(), torch.no_grad():
        model = megatron_io.build_megatron_model(checkpoint, cfg)
        want = model(tokens, torch.arange(57).expand_as(tokens), None)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(tokens, use_cache=False, float32_logits=True).logits
    return want.double(), got.double()


@pytest.mark.parametrize("run", ["run_tp1", "run_tp2", "run_nope_tied"])
def test_exported_logits_match_megatron(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "hf"
    convert("to-hf", run_dir, out)
    want, got = _logits_both(run_dir, out)
    log_p, log_q = want.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert kl.max().item() < 1e-9
    assert (want - got).abs().max().item() < 1e-4
    # The verify command reports the same comparison and passes.
    report = convert("verify", run_dir, out, "--batches", "2", "--seq-len", "40")
    assert "PASS" in report.stdout and "top-1 agreement         1.000000" in report.stdout
    # The HF config records the architecture, including the layer pattern.
    cfg = megatron_io.read_model_config(megatron_io.resolve_checkpoint(run_dir))
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["lucid_layers"] == [i + 1 for i, x in enumerate(cfg.layer_is_lucid()) if x]
    assert hf_config["position_embedding"] == cfg.position_embedding
    assert hf_config["auto_map"]["AutoModelForCausalLM"] == "modeling_lucid.LucidForCausalLM"


def test_export_directory_contents(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "configuration_lucid.py", "modeling_lucid.py", "model.safetensors",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (256, 257, 258)


def test_large_models_are_sharded_with_an_index(run_tp1, tmp_path):
    out = tmp_path / "hf"
    convert("to-hf", run_tp1, out, "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    want, got = _logits_both(run_tp1, out)
    assert (want - got).abs().max().item() < 1e-4


def test_tokenizer_files_encode_like_training(exported):
    from transformers import AutoTokenizer

    from lucid_megatron.data.tokenizer import ByteTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    text = "key ABCD is 1234. what is ABCD? héllo"
    assert tok(text)["input_ids"] == [256] + ByteTokenizer().encode(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
