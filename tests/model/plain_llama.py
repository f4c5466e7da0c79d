"""An independent plain-PyTorch Llama with LUCID layers, for checking the Megatron model.

Written from the architecture's definition (RMSNorm, RoPE with rotate-half, GQA, SwiGLU), reading
weights by their Megatron names; attention goes through the operator's dense reference backend.
"""

import torch
import torch.nn.functional as F

from lucid_megatron.ops import lucid_attention


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, base):
    """x [b, n, heads, d]; positions [b, n]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[..., None].float() * inv_freq  # [b, n, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * angles.cos() + rotated * angles.sin()


def _dense_causal_softmax(q, k, v, cu_seqlens):
    """Softmax baseline written out densely (GQA by repetition), packed documents masked."""
    b, n, hq, d = q.shape
    group = hq // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / d**0.5
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if cu_seqlens is not None:
        doc = torch.zeros(n, dtype=torch.long)
        for i, start in enumerate(cu_seqlens[1:-1].tolist()):
            doc[start:] = i + 1
        allowed &= doc[:, None] == doc[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


def plain_forward(weights, cfg, tokens, positions, cu_seqlens=None):
    """Logits [b, n, padded_vocab] of the Llama described by ``cfg`` (a ModelConfig)."""
    w = weights
    hq, hkv, hd = cfg.num_attention_heads, cfg.kv_heads, cfg.kv_channels
    x = w["embedding.word_embeddings.weight"][tokens]
    b, n, _ = x.shape
    for i, lucid in enumerate(cfg.layer_is_lucid()):
        p = f"decoder.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], cfg.norm_eps)
        qkv = (h @ w[p + "self_attention.linear_qkv.weight"].T).view(b, n, hkv, hq // hkv + 2, hd)
        q = qkv[:, :, :, : hq // hkv].reshape(b, n, hq, hd)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if cfg.position_embedding == "rope":
            q, k = _rope(q, positions, cfg.rotary_base), _rope(k, positions, cfg.rotary_base)
        if lucid:
            o = lucid_attention(q, k, v, cu_seqlens=cu_seqlens, eps=cfg.lucid_eps, backend="reference")
        else:
            o = _dense_causal_softmax(q, k, v, cu_seqlens)
        x = x + o.reshape(b, n, hq * hd) @ w[p + "self_attention.linear_proj.weight"].T
        h = _rms_norm(x, w[p + "pre_mlp_layernorm.weight"], cfg.norm_eps)
        gate, up = (h @ w[p + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.linear_fc2.weight"].T
    x = _rms_norm(x, w["decoder.final_layernorm.weight"], cfg.norm_eps)
    out_w = w["embedding.word_embeddings.weight"] if cfg.tie_embeddings else w["output_layer.weight"]
    return x @ out_w.T


def plain_loss(weights, cfg, tokens, labels, positions, cu_seqlens=None):
    logits = plain_forward(weights, cfg, tokens, positions, cu_seqlens)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
