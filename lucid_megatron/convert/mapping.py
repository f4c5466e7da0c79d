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
"""

from __future__ import annotations

import torch

from lucid_megatron.config import ModelConfig


def _qkv_shape(cfg: ModelConfig):
    groups = cfg.kv_heads
    return groups, cfg.num_attention_heads // groups, cfg.kv_channels, cfg.hidden_size


def megatron_to_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    groups, per_group, hd, hidden = _qkv_shape(cfg)
    out = {"model.embed_tokens.weight": weights["embedding.word_embeddings.weight"],
           "model.norm.weight": weights["decoder.final_layernorm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = weights["output_layer.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = weights[m + "self_attention.linear_qkv.weight"].reshape(groups, per_group + 2, hd, hidden)
        gate, up = weights[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({
            h + "input_layernorm.weight": weights[m + "input_layernorm.weight"],
            h + "self_attn.q_proj.weight": qkv[:, :per_group].reshape(groups * per_group * hd, hidden),
            h + "self_attn.k_proj.weight": qkv[:, per_group].reshape(groups * hd, hidden),
            h + "self_attn.v_proj.weight": qkv[:, per_group + 1].reshape(groups * hd, hidden),
            h + "self_attn.o_proj.weight": weights[m + "self_attention.linear_proj.weight"],
            h + "post_attention_layernorm.weight": weights[m + "pre_mlp_layernorm.weight"],
            h + "mlp.gate_proj.weight": gate,
            h + "mlp.up_proj.weight": up,
            h + "mlp.down_proj.weight": weights[m + "mlp.linear_fc2.weight"],
        })
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}  # no shared views


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    hidden, hd, ffn, vocab = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size, cfg.padded_vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        shapes.update({
            h + "input_layernorm.weight": (hidden,),
            h + "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, hidden),
            h + "self_attn.k_proj.weight": (cfg.kv_heads * hd, hidden),
            h + "self_attn.v_proj.weight": (cfg.kv_heads * hd, hidden),
            h + "self_attn.o_proj.weight": (hidden, cfg.num_attention_heads * hd),
            h + "post_attention_layernorm.weight": (hidden,),
            h + "mlp.gate_proj.weight": (ffn, hidden),
            h + "mlp.up_proj.weight": (ffn, hidden),
            h + "mlp.down_proj.weight": (hidden, ffn),
        })
    return shapes


def check_hf_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Every expected tensor present with the expected shape; errors name the tensor and the file."""
    expected = expected_hf_shapes(cfg)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")


def hf_to_megatron(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    groups, per_group, hd, hidden = _qkv_shape(cfg)
    out = {"embedding.word_embeddings.weight": weights["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": weights["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = weights["lm_head.weight"]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = weights[h + "self_attn.q_proj.weight"].reshape(groups, per_group, hd, hidden)
        k = weights[h + "self_attn.k_proj.weight"].reshape(groups, 1, hd, hidden)
        v = weights[h + "self_attn.v_proj.weight"].reshape(groups, 1, hd, hidden)
        out.update({
            m + "input_layernorm.weight": weights[h + "input_layernorm.weight"],
            m + "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden),
            m + "self_attention.linear_proj.weight": weights[h + "self_attn.o_proj.weight"],
            m + "pre_mlp_layernorm.weight": weights[h + "post_attention_layernorm.weight"],
            m + "mlp.linear_fc1.weight": torch.cat([weights[h + "mlp.gate_proj.weight"],
                                                    weights[h + "mlp.up_proj.weight"]], dim=0),
            m + "mlp.linear_fc2.weight": weights[h + "mlp.down_proj.weight"],
        })
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}  # no shared views
