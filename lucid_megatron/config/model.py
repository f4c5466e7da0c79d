"""Model architecture config (Llama-style GPT with LUCID or softmax attention per layer)."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Literal, Union


from .schema import ConfigError, from_dict, read_yaml_file

# Package data (pyproject: package-data), so a wheel install finds them as well as a checkout.
MODEL_PRESET_DIR = Path(str(resources.files("lucid_megatron.config") / "presets"))


def parse_lucid_layers(pattern: Union[str, list[int]], num_layers: int) -> list[bool]:
    """Which layers (in order) use LUCID attention; the others use softmax attention.

    ``"all"`` / ``"none"``; ``"every:K"`` -> layers K, 2K, ... (1-based, like Megatron's layer
    numbers); or an explicit list of 1-based layer numbers.
    """
    if isinstance(pattern, list):
        bad = [i for i in pattern if not 1 <= i <= num_layers]
        if bad or len(set(pattern)) != len(pattern):
            raise ConfigError(
                f"lucid_layers: layer numbers must be distinct and in 1..{num_layers}, got {pattern}"
            )
        return [i + 1 in pattern for i in range(num_layers)]
    if pattern == "all":
        return [True] * num_layers
    if pattern == "none":
        return [False] * num_layers
    if isinstance(pattern, str) and pattern.startswith("every:"):
        k = pattern.split(":", 1)[1]
        if k.isdigit() and int(k) >= 1:
            return [(i + 1) % int(k) == 0 for i in range(num_layers)]
    raise ConfigError(
        f"lucid_layers: unknown pattern {pattern!r}; allowed: 'all', 'none', 'every:K' (K >= 1), "
        "or a list of 1-based layer numbers"
    )


ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")


@dataclasses.dataclass
class RopeScaling:
    """How RoPE's frequencies are stretched for contexts longer than the model was trained on (docs/training.md,
    "Extending the context").  ``type``: ``none``; ``linear`` (position interpolation: positions / factor);
    ``llama3`` (Llama 3.x: long wavelengths / factor, short ones kept, a smooth ramp between); ``yarn``
    (per-frequency ramp between interpolation and extrapolation, and an attention factor on cos/sin).  The
    field names and meanings are transformers' ``rope_parameters``, so an export's config.json carries them as is."""

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: float = 1.0  # new context / original context
    original_max_position_embeddings: int | None = None  # the length the model was trained at (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    beta_fast: float = 32.0  # yarn: rotations in the original length above which a frequency is kept
    beta_slow: float = 1.0  # yarn: rotations below which a frequency is interpolated (divided by factor)
    # yarn: both set -> attention factor (1 + 0.1 mscale ln f) / (1 + 0.1 mscale_all_dim ln f) (DeepSeek's form);
    # otherwise 1 + 0.1 ln f (the YaRN paper's)
    mscale: float | None = None
    mscale_all_dim: float | None = None

    def validate(self) -> None:
        if self.type == "none":
            if self.factor != 1.0:
                raise ConfigError(f"factor: {self.factor} needs a scaling type; allowed types: "
                                  f"{', '.join(ROPE_SCALING_TYPES[1:])} (or factor 1 with type none)")
            return
        if not self.factor > 1.0:
            raise ConfigError(f"factor: must be > 1 for type {self.type!r} (new length / original), got {self.factor}")
        if self.type in ("llama3", "yarn") and self.original_max_position_embeddings is None:
            raise ConfigError(f"original_max_position_embeddings: required for type {self.type!r} "
                              "(the length the model was trained at)")
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            raise ConfigError(f"original_max_position_embeddings: must be >= 1, got "
                              f"{self.original_max_position_embeddings}")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"low_freq_factor: must be > 0 and below high_freq_factor "
                              f"({self.high_freq_factor}), got {self.low_freq_factor}")
        if self.type == "yarn" and not 0 < self.beta_slow < self.beta_fast:
            raise ConfigError(f"beta_slow: must be > 0 and below beta_fast ({self.beta_fast}), got {self.beta_slow}")

    def __repr__(self) -> str:  # the fields that differ from the defaults: messages stay one readable line
        default = RopeScaling()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name == "type" or getattr(self, f.name) != getattr(default, f.name)]
        return f"RopeScaling({', '.join(changed)})"

    @property
    def yarn_attention_factor(self) -> float:
        """What YaRN multiplies cos and sin by (so attention logits by its square)."""
        def m(scale: float) -> float:
            return 1.0 + 0.1 * scale * math.log(self.factor)
        if self.mscale and self.mscale_all_dim:
            return m(self.mscale) / m(self.mscale_all_dim)
        return m(1.0)


# A resumed run keeps every field but the few train/validate.py's FREE_MODEL_FIELDS lists: `lucid train` compares
# the checkpoint's model.yaml with the config field by field, so a field added here is covered without more code.
@dataclasses.dataclass
class ModelConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int
    num_kv_heads: int | None = None  # None -> num_attention_heads (no GQA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_seq_len: int = 2048
    position_embedding: Literal["rope", "none"] = "rope"
    rotary_base: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    lucid_layers: Union[str, list[int]] = "all"
    lucid_eps: float = 1e-6
    init_std: float = 0.02
    # The padded vocabulary is a multiple of this; it must not depend on the TP size, so that
    # initialisation and checkpoints are the same for every TP layout (TP must divide it).
    make_vocab_size_divisible_by: int = 128
    # Megatron layer implementation: "local" (plain PyTorch, any machine) or "te" (Transformer Engine's
    # fused norm+linear, GPU only). Checkpoints are the same either way: the local spec maps its norm
    # keys to TE's names, so a run saved with one loads into the other.
    spec: Literal["local", "te"] = "local"

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "max_seq_len", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.kv_heads < 1 or self.num_attention_heads % self.kv_heads:
            raise ConfigError(
                f"num_kv_heads: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_kv_heads ({self.kv_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"head_dim: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError(f"head_dim: must be >= 1, got {self.head_dim}")
        if self.position_embedding == "rope" and self.kv_channels % 2:
            raise ConfigError(f"head_dim: RoPE needs an even head dim, got {self.kv_channels}")
        for name in ("norm_eps", "lucid_eps", "init_std", "rotary_base"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        parse_lucid_layers(self.lucid_layers, self.num_layers)
        if self.rope_scaling.type != "none" and self.position_embedding != "rope":
            raise ConfigError(f"rope_scaling.type: {self.rope_scaling.type!r} needs position_embedding 'rope', "
                              f"got {self.position_embedding!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_attention_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // m) * m

    def layer_is_lucid(self) -> list[bool]:
        return parse_lucid_layers(self.lucid_layers, self.num_layers)


def model_preset_names() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str, overrides: dict | None = None) -> ModelConfig:
    """A named preset from lucid_megatron/config/presets/ (e.g. ``"tiny"``) or a YAML path, plus overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"model preset {name_or_path!r} not found; available: {', '.join(model_preset_names())}"
            )
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"model config {str(path)!r}: expected a mapping of model fields")
    data.update(overrides or {})
    return from_dict(ModelConfig, data, "model")
