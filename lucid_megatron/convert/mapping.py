"""Parameter names and layouts: Megatron-Core GPT <-> Hugging Face (LUCID, and Llama, which shares the names).

| Megatron (TP-independent full tensors)            | Hugging Face                                   |
|---------------------------------------------------|------------------------------------------------|
| embedding.word_embeddings.weight                  | model.embed_tokens.weight                      |
| decoder.layers.N.input_layernorm.weight           | model.layers.N.input_layernorm.weight          |
| decoder.layers.N.self_attention.linear_qkv.weight | q_proj / k_proj / v_proj (per query group: the |
|                                                   |   group's query heads, then its key, its value) |
| decoder.layers.N.self_attention.linear_proj.weight| model.layers.N.self_attn.o_proj.weight         |
| decoder.layers.N.pre_mlp_layernorm.weight         | model.layers.N.post_attention_layernorm.weight |
| decoder.layers.N.mlp.linear_fc1.weight            | [gate_proj; up_proj]                           |
| decoder.layers.N.mlp.linear_fc2.weight            | model.layers.N.mlp.down_proj.weight            |
| decoder.final_layernorm.weight                    | model.norm.weight                              |
| output_layer.weight (untied only)                 | lm_head.weight                                 |

Both use the rotate-half RoPE convention, so no q/k permutation is needed.

Vocabulary: Megatron pads the embedding and output layer to a multiple (``padded_vocab_size``); no token
reaches those rows, so the export keeps only the tokenizer's rows, and the import appends the padding rows
again (as the mean row, see ``_vocab_rows``).
"""

from __future__ import annotations

import torch

from lucid_megatron.config import ModelConfig

# The one name map, Megatron -> Hugging Face; the other direction inverts it.  "{i}" is the layer index.
NAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",  # untied embeddings only
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# The only special cases: Megatron fuses these, Hugging Face keeps them apart.
QKV = ("decoder.layers.{i}.self_attention.linear_qkv.weight",
       ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight"))
FC1 = ("decoder.layers.{i}.mlp.linear_fc1.weight",
       ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"))


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every one-to-one tensor of a model, Megatron name -> Hugging Face name."""
    names = {}
    for megatron, hf in NAMES.items():
        if megatron == "output_layer.weight" and cfg.tie_embeddings:
            continue
        layers = range(cfg.num_layers) if "{i}" in megatron else [None]
        names.update({megatron.format(i=i): hf.format(i=i) for i in layers})
    return names


# The tensors with one row per vocabulary entry.
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def exported_vocab_size(cfg: ModelConfig, tokenizer: dict) -> int:
    """Vocabulary rows of the export: the tokenizer's (the model's ``vocab_size`` when none is recorded)."""
    size = tokenizer.get("vocab_size") or cfg.vocab_size
    if not 0 < size <= cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.get('name')!r} has {size} tokens but the model has {cfg.vocab_size} "
                         f"(model.vocab_size); allowed: 1..{cfg.vocab_size}, the tokenizer the model was trained with")
    return size


def _vocab_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` vocabulary rows; rows beyond the tensor's (Megatron's padding) are the mean row.

    Why the mean: training pushes every logit of a token that never occurs far down (to about the mean logit
    of the real vocabulary), so zero rows (logit 0) would take real probability in Megatron's loss over the
    padded vocabulary (measured on a trained model: +1.2 nats on answer tokens), mean rows hardly any (+3e-5).
    """
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, tensor.mean(0, keepdim=True).expand(rows - tensor.shape[0], *tensor.shape[1:])])


def _qkv_shape(cfg: ModelConfig):
    groups = cfg.kv_heads
    return groups, cfg.num_attention_heads // groups, cfg.kv_channels, cfg.hidden_size


def _contiguous(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in weights.items()}  # no shared views


def megatron_to_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Hugging Face tensors with ``vocab_size`` vocabulary rows (Megatron's padding rows dropped)."""
    groups, per_group, hd, hidden = _qkv_shape(cfg)
    out = {hf: _vocab_rows(weights[megatron], vocab_size) if megatron in VOCAB_ROWS else weights[megatron]
           for megatron, hf in name_map(cfg).items()}
    for i in range(cfg.num_layers):
        qkv = weights[QKV[0].format(i=i)].reshape(groups, per_group + 2, hd, hidden)
        q, k, v = (name.format(i=i) for name in QKV[1])
        out[q] = qkv[:, :per_group].reshape(groups * per_group * hd, hidden)
        out[k] = qkv[:, per_group].reshape(groups * hd, hidden)
        out[v] = qkv[:, per_group + 1].reshape(groups * hd, hidden)
        gate, up = (name.format(i=i) for name in FC1[1])
        out[gate], out[up] = weights[FC1[0].format(i=i)].chunk(2, dim=0)
    return _contiguous(out)


def hf_to_megatron(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Megatron tensors; the vocabulary rows are padded to ``cfg.padded_vocab_size`` (mean rows, ``_vocab_rows``)."""
    groups, per_group, hd, hidden = _qkv_shape(cfg)
    out = {megatron: _vocab_rows(weights[hf], cfg.padded_vocab_size) if megatron in VOCAB_ROWS else weights[hf]
           for megatron, hf in name_map(cfg).items()}
    for i in range(cfg.num_layers):
        q, k, v = (weights[name.format(i=i)] for name in QKV[1])
        parts = [q.reshape(groups, per_group, hd, hidden), k.reshape(groups, 1, hd, hidden),
                 v.reshape(groups, 1, hd, hidden)]
        out[QKV[0].format(i=i)] = torch.cat(parts, dim=1).reshape(-1, hidden)
        out[FC1[0].format(i=i)] = torch.cat([weights[name.format(i=i)] for name in FC1[1]], dim=0)
    return _contiguous(out)
