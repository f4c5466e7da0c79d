"""Typed configuration: dataclass schemas, strict YAML loading, presets."""

from .parallel import ParallelConfig
from .model import ModelConfig, RopeScaling, load_model_config, model_preset_names, parse_lucid_layers
from .schema import ConfigError, from_dict, to_dict

__all__ = [
    "ConfigError", "ModelConfig", "ParallelConfig", "RopeScaling", "from_dict", "load_model_config", "model_preset_names",
    "parse_lucid_layers", "to_dict",
]
