"""Megatron -> Hugging Face -> Megatron gives bit-identical weights (TP=2-trained, mixed pattern; NoPE tied); the
vocabulary padding rows, which no token reaches and the export leaves out, come back as the mean row."""

import pytest
import torch

from lucid_megatron.convert import mapping, megatron_io

from .conftest import convert


@pytest.mark.parametrize("run", ["run_tp2", "run_nope_tied"])
def test_round_trip_is_bit_identical(run, request, tmp_path):
    run_dir = request.getfixturevalue(run)
    convert("to-hf", run_dir, tmp_path / "hf")
    result = convert("from-hf", tmp_path / "hf", tmp_path / "back", "--tp", "2")
    assert "loads at any TP (TP=2 fits)" in result.stdout
    original = megatron_io.resolve_checkpoint(run_dir)
    back = megatron_io.resolve_checkpoint(tmp_path / "back")
    cfg, cfg_back = megatron_io.read_model_config(original), megatron_io.read_model_config(back)
    # the architecture, layer pattern and vocabulary padding survive
    same = ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "kv_channels", "ffn_hidden_size",
            "vocab_size", "padded_vocab_size", "position_embedding", "rotary_base", "tie_embeddings", "norm_eps",
            "lucid_eps", "max_seq_len")
    assert {k: getattr(cfg_back, k) for k in same} == {k: getattr(cfg, k) for k in same}
    assert cfg_back.layer_is_lucid() == cfg.layer_is_lucid()
    with megatron_io.single_process():
        want = megatron_io.load_megatron_weights(original, cfg)
        got = megatron_io.load_megatron_weights(back, cfg_back)
    assert got.keys() == want.keys()
    vocab = cfg.vocab_size
    for name in want:
        if name in mapping.VOCAB_ROWS:
            assert got[name].shape == want[name].shape == (cfg.padded_vocab_size, cfg.hidden_size), name
            assert torch.equal(got[name][:vocab], want[name][:vocab]), name
            assert torch.equal(got[name][vocab:], want[name][:vocab].mean(0).expand(got[name].shape[0] - vocab, -1))
        else:
            assert torch.equal(got[name], want[name]), name
    assert sum(name in mapping.VOCAB_ROWS for name in want) == (1 if cfg.tie_embeddings else 2)
    assert megatron_io.read_state(back)["tokenizer"]["kind"] == "byte"
