"""--init-from-llama: a Hugging Face Llama's weights start a LUCID model (attention swapped)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lucid_megatron.convert import megatron_io

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
