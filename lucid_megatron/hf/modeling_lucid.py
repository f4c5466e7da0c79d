"""Hugging Face model of a LUCID causal LM, in plain PyTorch.

Self-contained: exported model directories carry a copy of this file, so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works with only torch and transformers
installed.  When ``lucid_megatron`` is importable its memory-linear preconditioner is used for full
sequences; otherwise a blocked PyTorch solve below (exact, same math).

LUCID (arXiv 2602.10410): per KV head, ``kn = k / rms(k)``, ``L_ij = exp(s kn_i.kn_j - 1/s)`` for ``j < i``,
``L_ii = 1``, ``V' = L^{-1} V``, ``O = softmax_causal(q k^T / sqrt(d)) V'``.  The generation cache keeps K, kn
and V' (not V); ``m >= 1`` new tokens are solved against the cached prefix.  Left padding is supported: padded
positions take no part in the preconditioner or the attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_lucid import LucidConfig

try:  # the project's memory-linear operator, when installed
    from lucid_megatron.ops import lucid_precondition as _fast_precondition
except ImportError:
    _fast_precondition = None

_BLOCK = 128


# ---- LUCID preconditioner (plain PyTorch) ----------------------------------------------------------


def _rms_normalize(k: torch.Tensor, eps: float) -> torch.Tensor:
    k = k.float()
    return k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)


def _solve(kn: torch.Tensor, v: torch.Tensor, prefix_kn=None, prefix_vp=None) -> torch.Tensor:
    """V' of new rows ``[B, H, T, .]`` (float32 or float64) given an already solved prefix, in row blocks."""
    s = kn.shape[-1] ** -0.5
    parts = []
    for a in range(0, kn.shape[2], _BLOCK):
        rows = kn[:, :, a : a + _BLOCK] * s
        acc = v[:, :, a : a + _BLOCK].to(kn.dtype)
        sources = [(prefix_kn, prefix_vp)] if prefix_kn is not None else []
        if parts:
            sources.append((kn[:, :, :a], torch.cat(parts, dim=2)))
        for src_kn, src_vp in sources:
            acc = acc - torch.exp(rows @ src_kn.transpose(-1, -2) - 1.0 / s) @ src_vp
        diag = torch.exp(rows @ kn[:, :, a : a + _BLOCK].transpose(-1, -2) - 1.0 / s)
        # unitriangular: the diagonal of `diag` is never read, L_ii is exactly 1
        parts.append(torch.linalg.solve_triangular(diag, acc, upper=False, unitriangular=True))
    return torch.cat(parts, dim=2)


def lucid_values(k: torch.Tensor, v: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kn, V') for whole causal sequences ``[B, H, T, .]``; V' in float32 (float64 for float64 inputs)."""
    kn = _rms_normalize(k, eps).to(torch.float64 if k.dtype == torch.float64 else torch.float32)
    if _fast_precondition is not None:  # blockwise autograd, memory-linear in training too
        vp = _fast_precondition(k.transpose(1, 2), v.transpose(1, 2), eps=eps).transpose(1, 2).to(kn.dtype)
    else:
        vp = _solve(kn, v)
    return kn, vp


# ---- cache ---------------------------------------------------------------------------------------------


class LucidCache:
    """Decode state: per layer keys (for the softmax) and, for LUCID layers, normalised keys and V' (else V).

    Tensors are ``[B, Hkv, T, .]``; ``valid [B, T]`` marks non-padding positions.
    """

    def __init__(self, num_layers: int):
        self.layers: list[dict | None] = [None] * num_layers
        self.valid: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx`` selects."""
        for layer in self.layers:
            if layer is not None:
                for key in layer:
                    layer[key] = layer[key].index_select(0, beam_idx.to(layer[key].device))
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))


# ---- model ---------------------------------------------------------------------------------------------


class LucidRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(x, cos, sin):
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    return x * cos[:, None].to(x.dtype) + _rotate_half(x) * sin[:, None].to(x.dtype)


class LucidAttention(nn.Module):
    def __init__(self, config: LucidConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.lucid = (layer_idx + 1) in set(config.lucid_layers)
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.eps = config.lucid_eps
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def _attend(self, q, k, values, mask=None, causal=False):
        gqa = q.shape[1] != k.shape[1]
        if gqa:  # explicit repetition keeps this working on every SDPA version
            group = q.shape[1] // k.shape[1]
            k, values = k.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        return F.scaled_dot_product_attention(q, k, values.to(q.dtype), attn_mask=mask, is_causal=causal,
                                              scale=self.head_dim**-0.5)

    def _full(self, q, k, v):
        """Whole causal sequences: (output, cache entry)."""
        if self.lucid:
            kn, vp = lucid_values(k, v, self.eps)
            return self._attend(q, k, vp, causal=True), {"k": k, "kn": kn, "vp": vp}
        return self._attend(q, k, v, causal=True), {"k": k, "v": v}

    def forward(self, x, rope, valid, cache: LucidCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = _rope(q, *rope), _rope(k, *rope)
        past = cache.layers[self.layer_idx] if cache is not None else None

        if past is None:
            new_valid = valid[:, -t:]
            if bool(new_valid.all()):
                out, entry = self._full(q, k, v)
            else:  # left padding: every row on its own valid suffix; padding gets zeros everywhere
                out = q.new_zeros(b, self.num_heads, t, self.head_dim)
                entry = None
                for r in range(b):
                    start = int((~new_valid[r]).sum())
                    o_r, e_r = self._full(q[r : r + 1, :, start:], k[r : r + 1, :, start:], v[r : r + 1, :, start:])
                    out[r : r + 1, :, start:] = o_r
                    if entry is None:
                        entry = {key: val.new_zeros(b, val.shape[1], t, val.shape[-1]) for key, val in e_r.items()}
                    for key, val in e_r.items():
                        entry[key][r : r + 1, :, start:] = val
        else:  # m >= 1 new tokens against the cached prefix
            if self.lucid:
                kn = _rms_normalize(k, self.eps).to(past["kn"].dtype)
                vp = _solve(kn, v, past["kn"], past["vp"])  # cached padding has V' = 0: it contributes nothing
                entry = {"k": torch.cat([past["k"], k], 2), "kn": torch.cat([past["kn"], kn], 2),
                         "vp": torch.cat([past["vp"], vp], 2)}
                values = entry["vp"]
            else:
                entry = {"k": torch.cat([past["k"], k], 2), "v": torch.cat([past["v"], v], 2)}
                values = entry["v"]
            total = entry["k"].shape[2]
            positions = torch.arange(total, device=x.device)
            causal = positions[None, :] <= (total - t + torch.arange(t, device=x.device))[:, None]
            mask = causal[None, None] & valid[:, None, None, :total]
            out = self._attend(q, entry["k"], values, mask=mask)
        if cache is not None:
            cache.layers[self.layer_idx] = entry
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LucidMLP(nn.Module):
    def __init__(self, config: LucidConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LucidDecoderLayer(nn.Module):
    def __init__(self, config: LucidConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LucidRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LucidAttention(config, layer_idx)
        self.post_attention_layernorm = LucidRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LucidMLP(config)

    def forward(self, x, rope, valid, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, valid, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LucidPreTrainedModel(PreTrainedModel):
    config: LucidConfig
    config_class = LucidConfig
    base_model_prefix = "model"
    _no_split_modules = ["LucidDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LucidRMSNorm):
            nn.init.ones_(module.weight)


class LucidModel(LucidPreTrainedModel):
    def __init__(self, config: LucidConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LucidDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LucidRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _rope_frequencies(self, device):
        """RoPE's inverse frequencies on ``device`` and the factor on cos/sin, computed once per device (not at every
        decode step)."""
        cached = getattr(self, "_rope_cache", None)
        if cached is None or cached[0].device != torch.device(device):
            params = self.config.rope_parameters
            if params.get("rope_type", "default") == "default":
                d = self.config.head_dim
                exponents = torch.arange(0, d, 2, device=device).float() / d
                cached = 1.0 / (params["rope_theta"] ** exponents), 1.0
            else:  # scaled RoPE: transformers' own initialisers (the ones its Llama uses), from rope_parameters
                inv_freq, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](self.config, device)
                cached = inv_freq.to(device), factor
            self._rope_cache = cached
        return cached

    def _rope(self, position_ids, dtype):
        if self.config.position_embedding != "rope":
            return None
        inv_freq, attention_factor = self._rope_frequencies(position_ids.device)
        angles = position_ids.float()[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * attention_factor, angles.sin() * attention_factor

    def forward(self, input_ids, valid, position_ids, cache, keep_states=None):
        """The final normed hidden states and, for ``keep_states`` (indices into them), every hidden state the
        transformers convention lists: the embeddings, each layer's output, the last one after the final norm
        (``num_hidden_layers + 1`` entries; ones not kept are None)."""
        x = self.embed_tokens(input_ids)
        rope = self._rope(position_ids, x.dtype)
        keep = keep_states or set()  # only the kept ones are held: each is a [B, T, hidden] activation
        states = [x if 0 in keep else None]
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, rope, valid, cache)
            states.append(x if i in keep else None)
        x = self.norm(x)
        if keep_states is None:
            return x, None
        states[-1] = x if len(self.layers) in keep else None
        return x, tuple(states)


@dataclass
class LucidCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: LucidCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class LucidForCausalLM(LucidPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LucidConfig):
        super().__init__(config)
        self.model = LucidModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our cache holds K, normalised K and V' (see LucidCache)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None,
                use_cache=None, logits_to_keep=0, float32_logits=None, past_key_values=None,
                output_hidden_states=None, output_attentions=None, **kwargs):
        """``attention_mask`` [B, past + T] (1 = token, 0 = left padding) covers the cached tokens too.
        ``output_hidden_states``: True, or the indices of the hidden states to keep (transformers >= 5)."""
        if input_ids is None:
            raise ValueError("LucidForCausalLM needs input_ids")
        if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
            raise ValueError("output_attentions=True is not supported: LUCID layers never form their attention "
                             "matrix (V is preconditioned, then fused attention runs), so there are no weights to "
                             "return; output_hidden_states=True is")
        keep_states = self._hidden_state_indices(
            output_hidden_states if output_hidden_states is not None
            else getattr(self.config, "output_hidden_states", False))
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            valid = torch.ones(b, past + t, dtype=torch.bool, device=input_ids.device)
        else:
            valid = attention_mask.bool()
            if valid.shape != (b, past + t):
                raise ValueError(f"attention_mask has shape {tuple(valid.shape)}; expected {(b, past + t)} "
                                 f"(cached + new tokens)")
            if past and not bool(valid[:, past:].all()):
                raise ValueError("new tokens after the cached prefix must not be padding (only left padding)")
            if not bool((valid[:, 1:] | ~valid[:, :-1]).all()):
                raise ValueError("only left padding is supported: attention_mask must be 0...0 1...1 in every row")
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if use_cache and cache is None:
            cache = LucidCache(self.config.num_hidden_layers)
        hidden, hidden_states = self.model(input_ids, valid, position_ids, cache if use_cache else None, keep_states)
        if use_cache:
            cache.valid = valid
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if float32_logits or (float32_logits is None and labels is not None):
            logits = logits.float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return LucidCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                   hidden_states=hidden_states)

    def _hidden_state_indices(self, selection) -> set[int] | None:
        """Which of the ``num_hidden_layers + 1`` hidden states to return: all (True), none (False/None), or the
        index or indices given (negative ones count from the end)."""
        count = self.config.num_hidden_layers + 1
        if selection is None or selection is False:
            return None
        if selection is True:
            return set(range(count))
        indices = [selection] if isinstance(selection, int) else list(selection)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count]
        if bad:
            raise ValueError(f"output_hidden_states={selection!r}: index {bad[0]!r} is not allowed; allowed: True, "
                             f"False or indices in [-{count}, {count - 1}] ({count} hidden states)")
        return {i % count for i in indices}

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True,
                                      past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask, "cache": cache,
                  "use_cache": use_cache}
        for key in ("float32_logits", "logits_to_keep", "output_hidden_states", "output_attentions"):
            if key in kwargs:
                inputs[key] = kwargs[key]
        return inputs
