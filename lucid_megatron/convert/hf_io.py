"""Hugging Face model directories: config, safetensors weights (sharded with an index), tokenizer files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lucid_megatron import atomic
from lucid_megatron.config import ConfigError, ModelConfig, from_dict, to_dict
from lucid_megatron.hf import AUTO_MAP, REMOTE_CODE_FILES, LucidConfig, LucidForCausalLM

from .mapping import exported_vocab_size
from .rope_parameters import hf_rope_parameters, rope_from_hf

SUPPORTED_ARCHITECTURES = ("lucid", "llama")


def hf_config_for(cfg: ModelConfig, tokenizer: dict) -> LucidConfig:
    """The export's config; its ``vocab_size`` is the tokenizer's (Megatron's padding rows are not exported)."""
    hf = LucidConfig(
        vocab_size=exported_vocab_size(cfg, tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.kv_channels, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, position_embedding=cfg.position_embedding, rope_theta=cfg.rotary_base,
        rope_parameters=hf_rope_parameters(cfg),
        lucid_layers=[i + 1 for i, lucid in enumerate(cfg.layer_is_lucid()) if lucid], lucid_eps=cfg.lucid_eps,
        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.get("bos_id"), eos_token_id=tokenizer.get("eos_id"),
        pad_token_id=tokenizer.get("pad_id"),
    )
    hf.architectures = ["LucidForCausalLM"]
    hf.auto_map = dict(AUTO_MAP)
    # What the Megatron side needs back (the model's vocabulary and its padding, original layer pattern).
    hf.lucid_megatron = {"vocab_size": cfg.vocab_size, "lucid_layers": cfg.lucid_layers,
                         "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
                         "tokenizer_kind": tokenizer.get("kind")}
    return hf


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def model_config_from_hf(config: dict, source: Path, *, from_llama: bool, lucid_layers=None) -> ModelConfig:
    """The ModelConfig of a LUCID export, or of a Llama model whose attention becomes LUCID."""
    kind = config.get("model_type")
    if kind not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}/config.json: model_type {kind!r} is not supported; allowed: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama with --init-from-llama)")
    if (kind == "llama") != from_llama:
        raise ValueError(f"{source}/config.json: model_type {kind!r} " + (
            "needs --init-from-llama" if kind == "llama" else "is not a Llama model; drop --init-from-llama"))
    vocab = config["vocab_size"]
    if kind == "lucid":
        extra = config.get("lucid_megatron", {})
        fields = dict(
            vocab_size=extra.get("vocab_size", vocab),
            make_vocab_size_divisible_by=extra.get("make_vocab_size_divisible_by", math.gcd(vocab, 128)),
            lucid_layers=extra.get("lucid_layers", config["lucid_layers"]),
            position_embedding=config.get("position_embedding", "rope"), lucid_eps=config.get("lucid_eps", 1e-6),
        )
    else:
        for flag in ("attention_bias", "mlp_bias"):
            if config.get(flag):
                raise ValueError(f"{source}/config.json: {flag}=true is not supported (LUCID models have no biases)")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}/config.json: hidden_act={config['hidden_act']!r}; only 'silu' (SwiGLU)")
        fields = dict(
            vocab_size=vocab, make_vocab_size_divisible_by=math.gcd(vocab, 128),  # no padding rows
            lucid_layers=lucid_layers if lucid_layers is not None else "all", position_embedding="rope",
        )
    rotary_base, rope_scaling = rope_from_hf(config, source)
    fields.update(rotary_base=rotary_base, rope_scaling=to_dict(rope_scaling))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    fields.update(
        num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"], num_attention_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, config["hidden_size"] // heads) else head_dim,
        ffn_hidden_size=config["intermediate_size"], max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), norm_eps=config.get("rms_norm_eps", 1e-5),
        init_std=config.get("initializer_range", 0.02),
    )
    try:
        return from_dict(ModelConfig, fields, "model")
    except ConfigError as err:
        raise ValueError(f"{source}/config.json: {err}") from None


def expected_hf_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the Hugging Face model for ``cfg`` with ``vocab_size`` vocabulary rows, read off the
    model itself built on the meta device (no memory, no initialisation); tied embeddings appear once."""
    config = hf_config_for(cfg, {})
    config.vocab_size = vocab_size
    with torch.device("meta"):
        model = LucidForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_hf_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, source: str, vocab_size: int) -> None:
    """Every expected tensor present with the expected shape (``vocab_size``: the config's vocabulary rows, up
    to the padded size: exports before the rows were trimmed carry them); errors name the tensor and the file."""
    if not 0 < vocab_size <= cfg.padded_vocab_size:
        raise ValueError(f"{source}/config.json: vocab_size={vocab_size}; allowed: 1..{cfg.padded_vocab_size} "
                         f"(the model's vocabulary of {cfg.vocab_size} padded to a multiple of "
                         f"{cfg.make_vocab_size_divisible_by})")
    expected = expected_hf_shapes(cfg, vocab_size)
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(weights[name].shape)}, expected {shape}")


def _safetensors_files(hf_dir: Path) -> list[Path] | None:
    """The safetensors files of a model directory (the shards its index names, each present), None if it has none."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map' object)") from None
        for name in names:
            if not (hf_dir / name).exists():
                raise FileNotFoundError(f"{hf_dir / name} is missing (named by {index.name})")
        return [hf_dir / name for name in names]
    if (hf_dir / "model.safetensors").exists():
        return [hf_dir / "model.safetensors"]
    return None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards an index names; errors name the file."""
    files = _safetensors_files(Path(hf_dir))
    if files is None:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json")
    weights = {}
    for path in files:
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    return weights


# The weight files transformers loads a model from.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _saved_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file), read from the safetensors headers only (no tensor data)."""
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), "pt") as f:
                shapes.update({name: (tuple(f.get_slice(name).get_shape()), path) for name in f.keys()})
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    return shapes


def _config_shapes(hf_dir: Path, trust_remote_code: bool) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the model config.json describes, built on the meta device (no memory, no init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{hf_dir}/config.json: {_one_line(err)}") from None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _one_line(err: BaseException) -> str:
    """transformers' messages span lines (the advice, e.g. trust_remote_code, often on the last one)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def check_hf_model_dir(hf_dir, *, trust_remote_code: bool = False) -> None:
    """Refuses, in one line, a directory a model cannot be loaded from: missing, without config.json or weight
    files, or with a safetensors tensor whose shape is not the one config.json implies.  Reads headers only,
    so commands call it before any other work."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"Hugging Face model directory {str(hf_dir)!r} does not exist")
    read_config(hf_dir)
    if not any((hf_dir / name).exists() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{hf_dir} has no model weights ({', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]})")
    files = _safetensors_files(hf_dir)
    if files is None:  # pickled weights: their shapes cannot be read without unpickling them
        return
    expected = _config_shapes(hf_dir, trust_remote_code)
    for name, (shape, path) in _saved_shapes(files).items():
        if name in expected and shape != expected[name]:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape}, expected {expected[name]} (from config.json)")


def load_hf_model(hf_dir, *, trust_remote_code: bool = False):
    """A Hugging Face causal LM in float32 on the host, its directory checked first (``check_hf_model_dir``);
    what transformers still refuses comes back as one line."""
    from transformers import AutoModelForCausalLM

    check_hf_model_dir(hf_dir, trust_remote_code=trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code,
                                                    dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{hf_dir}: the model does not load: {_one_line(err)}") from None


def write_hf_dir(out_dir: Path, weights: dict[str, torch.Tensor], config: LucidConfig, tokenizer,
                 *, max_shard_size: str = "5GB") -> Path:
    """Write the model directory atomically (staged next to ``OUT``, renamed at the end)."""
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    with atomic.staged_directory(out_dir) as partial:
        _write_model_dir(partial, weights, config, tokenizer, max_shard_size, save_torch_state_dict,
                         GenerationConfig)
    return Path(out_dir)


def _write_model_dir(partial: Path, weights, config, tokenizer, max_shard_size, save_torch_state_dict,
                     GenerationConfig) -> None:
    save_torch_state_dict(weights, str(partial), max_shard_size=max_shard_size)
    config.save_pretrained(str(partial))
    for source in REMOTE_CODE_FILES:
        shutil.copy(source, partial / source.name)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(str(partial))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(partial))
