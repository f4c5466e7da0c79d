"""RoPE settings between the model config (``rotary_base``, ``rope_scaling``) and a Hugging Face config.json.

transformers (>= 5) reads them from ``rope_parameters``: ``{"rope_type": ..., "rope_theta": ..., "factor": ...}``;
configs written by transformers 4 (most Llama 3.x checkpoints on the Hub) carry ``rope_scaling`` (with ``rope_type``
or ``type``) and a top-level ``rope_theta``.  Exports write the first form; imports read both.
"""

from __future__ import annotations

import math

from lucid_megatron.config import ConfigError, ModelConfig, RopeScaling, from_dict

# transformers' rope_type names for ours ("default" is transformers' name for plain RoPE).
_FIELDS = {
    "linear": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"),
}
SUPPORTED_ROPE_TYPES = ("default", *_FIELDS)


def hf_rope_parameters(model: ModelConfig) -> dict:
    """The export's ``rope_parameters``: what transformers' rotary initialisers (ROPE_INIT_FUNCTIONS) read."""
    scaling = model.rope_scaling
    if scaling.type == "none":
        return {"rope_type": "default", "rope_theta": model.rotary_base}
    params = {"rope_type": scaling.type, "rope_theta": model.rotary_base}
    for name in _FIELDS[scaling.type]:
        value = getattr(scaling, name)
        if value is not None:
            params[name] = value
    return params


def rope_from_hf(config: dict, source) -> tuple[float, RopeScaling]:
    """``(rotary_base, rope_scaling)`` of a config.json in either form; a type or a setting this project cannot
    reproduce exactly is refused, naming it."""
    where = f"{source}/config.json"
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: RoPE type {rope_type!r} is not supported; allowed: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                         "(RoPE on the whole head only)")
    if rope_type == "default":
        return float(theta), RopeScaling()
    fields = {name: params[name] for name in _FIELDS[rope_type] if params.get(name) is not None}
    if rope_type == "yarn":
        if params.get("truncate", True) is not True:
            raise ValueError(f"{where}: rope_parameters.truncate={params['truncate']!r} is not supported "
                             "(the correction range is rounded to whole dimensions, transformers' default)")
        # transformers' defaults for what a YaRN config may leave out
        fields.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
        if "factor" not in fields and fields["original_max_position_embeddings"]:
            fields["factor"] = config["max_position_embeddings"] / fields["original_max_position_embeddings"]
    try:
        scaling = from_dict(RopeScaling, {"type": rope_type, **fields}, "rope_parameters")
    except ConfigError as err:
        raise ValueError(f"{where}: {err}") from None
    explicit = params.get("attention_factor")
    if rope_type == "yarn" and explicit is not None and not math.isclose(explicit, scaling.yarn_attention_factor,
                                                                        rel_tol=1e-12):
        raise ValueError(f"{where}: rope_parameters.attention_factor={explicit} is not supported; only the factor "
                         f"YaRN derives from factor and mscale ({scaling.yarn_attention_factor}) is")
    return float(theta), scaling
