"""RoPE and its scaling (model.rotary_base, model.rope_scaling) through Megatron-Core's own rotary embeddings.

Where each type comes from:
  none    Megatron's RotaryEmbedding.
  linear  Megatron's RotaryEmbedding with ``seq_len_interpolation_factor`` (positions / factor).
  yarn    Megatron's YarnRotaryEmbedding (``position_embedding_type="yarn"``), configured through the
          ``yarn_*`` attributes GPTModel and the attention read from the TransformerConfig; the attention
          multiplies cos and sin by the YaRN attention factor (Megatron's ``_yarn_get_concentration_factor``).
  llama3  Megatron's RotaryEmbedding and its Llama 3 frequency rule (``_apply_scaling``), applied here with all
          four parameters: GPTModel's own ``rope_scaling=True`` passes only the factor and fixes the original
          length at 8192 and the low/high frequency factors at 1 and 4.
"""

from __future__ import annotations

from lucid_megatron.config import ModelConfig


def gpt_model_rope_args(model: ModelConfig) -> dict:
    """GPTModel's keyword arguments for the model's position encoding."""
    if model.position_embedding != "rope":
        return {"position_embedding_type": "none"}
    scaling = model.rope_scaling
    args = {"position_embedding_type": "yarn" if scaling.type == "yarn" else "rope",
            "rotary_base": model.rotary_base, "rotary_percent": 1.0}
    if scaling.type == "linear":
        args["seq_len_interpolation_factor"] = scaling.factor
    return args


def yarn_config_attributes(model: ModelConfig) -> dict:
    """The ``yarn_*`` TransformerConfig attributes Megatron's YaRN reads (GPTModel builds the embedding from them,
    the attention its factor on cos/sin); empty unless the model uses YaRN."""
    scaling = model.rope_scaling
    if model.position_embedding != "rope" or scaling.type != "yarn":
        return {}
    # Megatron's factor is m(mscale) / m(mscale_all_dim) when both are given, else m(1): the same rule as
    # transformers' (both must be non-zero for the ratio), so the pair is passed only when both are set.
    both = bool(scaling.mscale and scaling.mscale_all_dim)
    return {
        "yarn_rotary_scaling_factor": scaling.factor,
        "yarn_original_max_position_embeddings": scaling.original_max_position_embeddings,
        "yarn_beta_fast": scaling.beta_fast,
        "yarn_beta_slow": scaling.beta_slow,
        "yarn_mscale": scaling.mscale if both else None,
        "yarn_mscale_all_dim": scaling.mscale_all_dim if both else None,
        "yarn_correction_range_round_to_int": True,  # transformers' default (`truncate`)
    }


def apply_llama3_frequencies(gpt, model: ModelConfig) -> None:
    """Rescale the built model's RoPE frequencies by the Llama 3 rule; a no-op for every other type.  Call before
    the first forward (the rotary embedding caches its tables per length)."""
    scaling = model.rope_scaling
    if model.position_embedding != "rope" or scaling.type != "llama3":
        return
    rotary = gpt.rotary_pos_emb
    rotary.inv_freq = rotary._apply_scaling(
        rotary.inv_freq, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )
    rotary.forward.cache_clear()
