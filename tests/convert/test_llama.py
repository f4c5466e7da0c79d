"""--init-from-llama: a Hugging Face Llama's weights start a LUCID model (attention swapped)."""

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lucid_megatron.config import RopeScaling
from lucid_megatron.convert import hf_io, megatron_io

from .conftest import convert


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return path, model


def _megatron_logits(checkpoint, tokens):
    checkpoint = megatron_io.resolve_checkpoint(checkpoint)
    cfg = megatron_io.read_model_config(checkpoint)
    with megatron_io.single_process(), torch.no_grad():
        model = megatron_io.build_megatron_model(checkpoint, cfg)
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None), cfg


def test_llama_weights_with_softmax_layers_reproduce_llama(llama_dir, tmp_path):
    """With every layer left as softmax the imported model IS the Llama: the mapping is exact."""
    path, llama = llama_dir
    convert("from-hf", path, tmp_path / "ckpt", "--init-from-llama", "--lucid-layers", "none")
    tokens = torch.randint(0, 320, (2, 45), generator=torch.Generator().manual_seed(1))
    got, cfg = _megatron_logits(tmp_path / "ckpt", tokens)
    with torch.no_grad():
        want = llama(tokens).logits
    assert cfg.padded_vocab_size == 320  # no padding rows added
    assert (got - want).abs().max().item() < 1e-5


def test_llama_becomes_lucid(llama_dir, tmp_path):
    path, llama = llama_dir
    result = convert("from-hf", path, tmp_path / "ckpt", "--init-from-llama", "--lucid-layers", "2")
    assert "LUCID layers [2]" in result.stdout
    tokens = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    got, cfg = _megatron_logits(tmp_path / "ckpt", tokens)
    with torch.no_grad():
        want = llama(tokens).logits
    assert cfg.layer_is_lucid() == [False, True]
    assert torch.isfinite(got).all() and not torch.allclose(got, want, atol=1e-3)  # attention really changed
    # and the weights are the Llama's
    with megatron_io.single_process():
        weights = megatron_io.load_megatron_weights(megatron_io.resolve_checkpoint(tmp_path / "ckpt"), cfg)
    assert torch.equal(weights["decoder.layers.1.mlp.linear_fc2.weight"], llama.model.layers[1].mlp.down_proj.weight)
    assert megatron_io.read_state(megatron_io.resolve_checkpoint(tmp_path / "ckpt"))["tokenizer"]["kind"] == "hf"


def test_llama_without_the_flag_is_refused(llama_dir, tmp_path):
    path, _ = llama_dir
    result = convert("from-hf", path, tmp_path / "ckpt", expect_ok=False)
    assert result.returncode == 2 and "model_type 'llama' needs --init-from-llama" in result.stderr


# Llama 3.x (rope_type llama3) and YaRN Llamas, small and built here: the original length is 32 and the
# comparison runs to 120 tokens, so every RoPE regime (kept, interpolated, ramped) is in use.
SCALED_LLAMAS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
}


def _scaled_llama(rope_parameters, path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      initializer_range=0.2, rope_parameters=dict(rope_parameters), bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("rope", list(SCALED_LLAMAS))
def test_scaled_rope_llama_imports_exactly(rope, llama_dir, tmp_path):
    import argparse
    import shutil

    from lucid_megatron.convert.cli import from_hf

    path = tmp_path / "llama"
    llama = _scaled_llama(SCALED_LLAMAS[rope], path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama_dir[0] / name).exists():
            shutil.copy(llama_dir[0] / name, path / name)
    from_hf(argparse.Namespace(hf_dir=str(path), checkpoint=str(tmp_path / "ckpt"), tp=1, init_from_llama=True,
                               lucid_layers="none"))
    tokens = torch.randint(0, 320, (2, 120), generator=torch.Generator().manual_seed(4))
    got, cfg = _megatron_logits(tmp_path / "ckpt", tokens)
    with torch.no_grad():
        want = llama(tokens).logits
    assert cfg.rope_scaling.type == rope and cfg.rope_scaling.original_max_position_embeddings == 32
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the same weights with plain RoPE are far off beyond the original length: the check can fail
    checkpoint = megatron_io.resolve_checkpoint(tmp_path / "ckpt")
    with megatron_io.single_process(), torch.no_grad():
        plain = megatron_io.build_megatron_model(checkpoint, dataclasses.replace(cfg, rope_scaling=RopeScaling()))
        unscaled = plain(tokens, torch.arange(120).expand_as(tokens), None)
    assert (unscaled - want)[:, 40:].abs().max().item() > 1e-2


# The form transformers 4 wrote (and most Llama 3.x configs on the Hub carry): rope_scaling plus top-level rope_theta.
LLAMA_31_CONFIG = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama_31_config_in_the_transformers_4_form():
    cfg = hf_io.model_config_from_hf(LLAMA_31_CONFIG, "llama-3.1-8b", from_llama=True)
    assert cfg.rotary_base == 500000.0 and cfg.max_seq_len == 131072
    assert (cfg.rope_scaling.type, cfg.rope_scaling.factor, cfg.rope_scaling.original_max_position_embeddings,
            cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.high_freq_factor) == ("llama3", 8.0, 8192, 1.0, 4.0)
    # YaRN written the old way ("type"), factor and original length as a Qwen2.5 long-context config has them
    yarn = {**LLAMA_31_CONFIG, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    cfg = hf_io.model_config_from_hf(yarn, "yarn-model", from_llama=True)
    assert (cfg.rotary_base, cfg.rope_scaling.type, cfg.rope_scaling.factor) == (1000000.0, "yarn", 4.0)


@pytest.mark.parametrize("rope_scaling, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "RoPE type 'dynamic' is not supported; allowed: default, linear, "
                                              "llama3, yarn"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
     "rope_parameters.original_max_position_embeddings: required for type 'llama3'"),
    ({"rope_type": "linear", "factor": 1.0}, "rope_parameters.factor: must be > 1 for type 'linear'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "attention_factor": 1.0},
     "rope_parameters.attention_factor=1.0 is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "truncate": False},
     "rope_parameters.truncate=False is not supported"),
])
def test_unsupported_rope_settings_are_refused_naming_them(rope_scaling, message):
    with pytest.raises(ValueError, match="^llama/config.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        hf_io.model_config_from_hf({**LLAMA_31_CONFIG, "rope_scaling": rope_scaling}, "llama", from_llama=True)
