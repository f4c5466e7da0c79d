"""Exported Hugging Face models reproduce the Megatron model's logits (float32, CPU)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lucid_megatron.convert import megatron_io
from lucid_megatron.data.tokenizer import ByteTokenizer

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
    # The export has the tokenizer's 259 rows; Megatron's padding rows (to 384), which no token reaches, are not
    # exported, so the comparison is over the real vocabulary.
    assert (want.shape[-1], got.shape[-1]) == (cfg.padded_vocab_size, ByteTokenizer.vocab_size)
    return want[..., : got.shape[-1]].double(), got.double()


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
    assert (hf_config["vocab_size"], hf_config["lucid_megatron"]["vocab_size"]) == (ByteTokenizer.vocab_size,) * 2


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

    tok = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    text = "key ABCD is 1234. what is ABCD? héllo"
    assert tok(text)["input_ids"] == [256] + ByteTokenizer().encode(text)
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # every id the model can produce is one the tokenizer has: no padding rows to generate
    assert len(tok) == json.loads((exported / "config.json").read_text())["vocab_size"] == ByteTokenizer.vocab_size


def test_hidden_states_match_megatron_layer_by_layer(run_tp1, exported):
    """output_hidden_states=True follows transformers: embeddings, each layer's output, the last after the final
    norm; each equals the Megatron model's tensor at the same place (forward hooks)."""
    checkpoint = megatron_io.resolve_checkpoint(run_tp1)
    cfg = megatron_io.read_model_config(checkpoint)
    tokens = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(8))
    want = []
    with megatron_io.single_process(), torch.no_grad():
        model = megatron_io.build_megatron_model(checkpoint, cfg)
        places = [model.embedding, *model.decoder.layers, model.decoder.final_layernorm]
        for module in places:  # Megatron's activations are [sequence, batch, hidden]
            module.register_forward_hook(lambda m, i, out: want.append(
                (out[0] if isinstance(out, tuple) else out).transpose(0, 1).clone()))
        model(tokens, torch.arange(37).expand_as(tokens), None)
    del want[-2]  # the last layer's output is reported after the final norm, as transformers does
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(tokens, use_cache=False, output_hidden_states=True)
        picked = hf(tokens, use_cache=False, output_hidden_states=[0, -1]).hidden_states
    assert len(out.hidden_states) == cfg.num_layers + 1 == len(want)
    for i, (got, ref) in enumerate(zip(out.hidden_states, want)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"hidden state {i}: {m}")
    torch.testing.assert_close(hf.lm_head(out.hidden_states[-1]), out.logits, rtol=0, atol=0)
    # indices select (transformers >= 5): the others are None
    assert picked[1:-1] == (None,) * (cfg.num_layers - 1)
    assert torch.equal(picked[0], out.hidden_states[0]) and torch.equal(picked[-1], out.hidden_states[-1])


def test_attention_weights_are_refused_clearly(exported):
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="output_attentions=True is not supported: LUCID layers never form"):
        hf(torch.zeros(1, 4, dtype=torch.long), output_attentions=True)
    with pytest.raises(ValueError, match=r"output_hidden_states=\[5\]: index 5 is not allowed; allowed: True, "
                                         r"False or indices in \[-3, 2\]"):
        hf(torch.zeros(1, 4, dtype=torch.long), output_hidden_states=[5])
