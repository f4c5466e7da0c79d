"""RoPE scaling (model.rotary_base, model.rope_scaling) from Megatron to Hugging Face and back.

One random model (sharp enough that a wrong position encoding shows: init_std 0.2) is saved with each RoPE setting,
exported, and compared at 4x the original length: Megatron (Megatron-Core's rotary embeddings) against the export
(transformers' rotary initialisers), the full forward and the decode cache, float32 on the CPU.
"""

import argparse
import json

import pytest
import torch

from lucid_megatron.config import ModelConfig, from_dict
from lucid_megatron.convert import hf_io, megatron_io
from lucid_megatron.convert.cli import compare_logits, to_hf
from lucid_megatron.data.tokenizer import ByteTokenizer
from lucid_megatron.runtime.parallelize import build_model

ORIGINAL, FACTOR, LENGTH = 32, 4.0, 120  # the comparison runs to 3.75x the original length
SETTINGS = {  # name -> (rotary_base, rope_scaling)
    "larger-base": (500000.0, {}),
    "linear": (10000.0, {"type": "linear", "factor": FACTOR}),
    "llama3": (500000.0, {"type": "llama3", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "yarn": (10000.0, {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL}),
    "yarn-mscale": (10000.0, {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL,
                              "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.8, "mscale_all_dim": 0.5}),
}
BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=259,
            max_seq_len=int(ORIGINAL * FACTOR), lucid_layers=[2], init_std=0.2)  # one softmax, one LUCID layer


def _config(name):
    base, scaling = SETTINGS[name]
    return from_dict(ModelConfig, {**BASE, "rotary_base": base, "rope_scaling": scaling}, "model")


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    with megatron_io.single_process() as runtime:
        model = build_model(runtime, ModelConfig(**BASE), precision="fp32", initialize=True)
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _export(weights, cfg, tmp_path):
    with megatron_io.single_process():
        checkpoint = megatron_io.save_megatron_checkpoint(tmp_path / "ckpt", weights, cfg,
                                                          {"tokenizer": ByteTokenizer().manifest_entry()})
    to_hf(argparse.Namespace(checkpoint=checkpoint, out_dir=str(tmp_path / "hf"), tokenizer=None, dtype="float32",
                             max_shard_size="5GB"))
    return checkpoint, tmp_path / "hf"


def _kl(want, got):
    log_p, log_q = want.double().log_softmax(-1), got.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_export_computes_the_same_positions(name, weights, tmp_path):
    cfg = _config(name)
    checkpoint, hf_dir = _export(weights, cfg, tmp_path)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    base, scaling = SETTINGS[name]
    stated = {"rope_type": scaling.get("type", "default"), "rope_theta": base,
              **{k: v for k, v in scaling.items() if k != "type"}}
    assert {k: hf_config["rope_parameters"].get(k) for k in stated} == stated

    # the full forward, beyond the original length: what `lucid convert verify` reports
    report = compare_logits(checkpoint, hf_dir, batches=1, batch_size=2, seq_len=LENGTH, trust_remote_code=True)
    assert report["max_kl"] <= 1e-6 and report["top1_agreement"] == 1.0, report

    # the decode cache: a 40-token prefill, then one token at a time, against Megatron's full forward
    tokens = torch.randint(0, 259, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    with megatron_io.single_process(), torch.no_grad():
        want = megatron_io.build_megatron_model(checkpoint, cfg)(tokens, torch.arange(LENGTH)[None], None)[..., :259]
    hf = hf_io.load_hf_model(hf_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        step = hf(tokens[:, :40], use_cache=True, float32_logits=True)
        pieces, cache = [step.logits], step.cache
        for t in range(40, LENGTH):
            step = hf(tokens[:, t : t + 1], cache=cache, attention_mask=torch.ones(1, t + 1, dtype=torch.long),
                      float32_logits=True)
            pieces.append(step.logits)
            cache = step.cache
    got = torch.cat(pieces, dim=1)
    assert _kl(want, got).max().item() <= 1e-6
    assert torch.equal(want.argmax(-1), got.argmax(-1))

    # a control that the comparison can fail: the same export read with plain RoPE (base 10000) disagrees
    hf_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    hf_config["rope_theta"] = 10000.0
    (hf_dir / "config.json").write_text(json.dumps(hf_config))
    wrong = compare_logits(checkpoint, hf_dir, batches=1, batch_size=2, seq_len=LENGTH, trust_remote_code=True)
    assert wrong["max_kl"] > 1e-3, wrong

    # and the export comes back with the same RoPE (lucid convert from-hf)
    hf_config["rope_parameters"] = stated
    back = hf_io.model_config_from_hf(hf_config, hf_dir, from_llama=False)
    assert (back.rotary_base, back.rope_scaling) == (cfg.rotary_base, cfg.rope_scaling)


def test_megatron_yarn_attention_factor_is_the_configured_one():
    """Megatron's factor on cos/sin (its own formula, read from the TransformerConfig) is the one the config
    states and transformers computes: both forms (mscale pair or not)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor_from_config,
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lucid_megatron.config import ParallelConfig
    from lucid_megatron.hf import LucidConfig
    from lucid_megatron.model.gpt import transformer_config

    for name in ("yarn", "yarn-mscale"):
        cfg = _config(name)
        megatron = _yarn_get_concentration_factor_from_config(transformer_config(cfg, ParallelConfig()))
        hf = LucidConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                          **{k: v for k, v in SETTINGS[name][1].items() if k != "type"}})
        _, transformers_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
        assert megatron == pytest.approx(cfg.rope_scaling.yarn_attention_factor, rel=1e-12)
        assert transformers_factor == pytest.approx(cfg.rope_scaling.yarn_attention_factor, rel=1e-12)
    assert _config("yarn").rope_scaling.yarn_attention_factor == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("scaling, message", [
    ({"type": "ntk"}, "model.rope_scaling.type: 'ntk' is not allowed; allowed: 'none', 'linear', 'llama3', 'yarn'"),
    ({"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 32},
     "model.rope_scaling.factor: must be > 1 for type 'yarn'"),
    ({"type": "linear", "factor": 0.5}, "model.rope_scaling.factor: must be > 1 for type 'linear'"),
    ({"type": "llama3", "factor": 8.0}, "model.rope_scaling.original_max_position_embeddings: required for type "
                                         "'llama3'"),
    ({"type": "yarn", "factor": 4.0}, "model.rope_scaling.original_max_position_embeddings: required for type 'yarn'"),
    ({"factor": 4.0}, "model.rope_scaling.factor: 4.0 needs a scaling type"),
    ({"type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32, "low_freq_factor": 4.0},
     "model.rope_scaling.low_freq_factor: must be > 0 and below high_freq_factor"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_slow": 40.0},
     "model.rope_scaling.beta_slow: must be > 0 and below beta_fast"),
    ({"type": "yarn", "factr": 4.0}, "model.rope_scaling.factr: unknown key; allowed: type, factor,"),
])
def test_bad_rope_scaling_names_the_field(scaling, message):
    from lucid_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(ModelConfig, {**BASE, "rope_scaling": scaling}, "model")


def test_rope_scaling_needs_rope():
    from lucid_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="model.rope_scaling.type: 'yarn' needs position_embedding 'rope', got 'none'"):
        from_dict(ModelConfig, {**BASE, "position_embedding": "none", "rope_scaling": SETTINGS["yarn"][1]}, "model")
