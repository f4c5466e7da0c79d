"""Model presets in lucid_megatron/config/presets/: they load, and their parameter counts are what they claim."""

import pytest

from lucid_megatron.config import load_model_config, model_preset_names

from .common import build, single_process_parallel


def _analytic_count(c):
    """Llama parameter count from the architecture's definition (no biases)."""
    h, hd = c.hidden_size, c.kv_channels
    attention = h * (c.num_attention_heads + 2 * c.kv_heads) * hd + c.num_attention_heads * hd * h
    per_layer = 2 * h + attention + 3 * h * c.ffn_hidden_size
    embeddings = c.padded_vocab_size * h * (1 if c.tie_embeddings else 2)
    return c.num_layers * per_layer + embeddings + h


def test_expected_presets_exist():
    assert {"tiny", "125m", "350m", "1b", "1b-hd16"} <= set(model_preset_names())


@pytest.mark.parametrize("name", model_preset_names())
def test_built_parameter_count_matches_definition(name):
    cfg = load_model_config(name)
    with single_process_parallel():
        model = build(cfg, initialize=False)  # uninitialised weights are never touched: cheap
    assert sum(p.numel() for p in model.parameters()) == _analytic_count(cfg)


def test_paper_shapes():
    one_b, hd16 = load_model_config("1b"), load_model_config("1b-hd16")
    assert (one_b.hidden_size, one_b.num_layers, one_b.num_attention_heads, one_b.kv_heads,
            one_b.ffn_hidden_size, one_b.vocab_size) == (2048, 22, 32, 4, 5632, 32000)
    assert abs(_analytic_count(one_b) - 1.1e9) / 1.1e9 < 0.02
    assert hd16.kv_channels == 16 and hd16.hidden_size == one_b.hidden_size
    assert _analytic_count(hd16) == _analytic_count(one_b)
