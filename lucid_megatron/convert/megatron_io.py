"""Reading and writing Megatron-format checkpoints as full (TP-independent) weights, in one process.

Megatron's distributed checkpoint format reshards on load, so a checkpoint written by any TP/DP/CP
layout loads here into a TP=1 model, and a checkpoint written here loads at any TP.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lucid_megatron.config import ModelConfig, ParallelConfig, from_dict, to_dict
from lucid_megatron.model.gpt import build_gpt_model
from lucid_megatron.parallel.state import destroy_parallel, initialize_parallel
from lucid_megatron.train.checkpoint import Checkpointer, save_weights_checkpoint


@contextlib.contextmanager
def single_process():
    """Megatron's parallel state for a world of one (reused if the caller already set one up)."""
    owned = not dist.is_initialized()
    if owned:
        initialize_parallel(1)
    try:
        yield
    finally:
        if owned:
            destroy_parallel()


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or the newest complete one under a checkpoints directory or a run directory."""
    path = Path(path)
    if (path / "COMPLETE").exists():
        return path
    for root in (path / "checkpoints", path):
        latest = Checkpointer(root).latest()
        if latest is not None:
            return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    raise FileNotFoundError(
        f"{str(path)!r} is not a complete checkpoint (no COMPLETE file) and holds none "
        "(expected RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXXXX)"
    )


def read_model_config(checkpoint: Path) -> ModelConfig:
    path = Path(checkpoint) / "model.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint does not record its model architecture")
    return from_dict(ModelConfig, yaml.safe_load(path.read_text()), "model")


def read_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def load_megatron_weights(checkpoint: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full weights by Megatron name (call inside :func:`single_process`)."""
    if not (Path(checkpoint) / "model").is_dir():
        raise FileNotFoundError(f"{Path(checkpoint) / 'model'} is missing: no Megatron weights in this checkpoint")
    model = build_gpt_model(cfg, ParallelConfig(), initialize=False)
    Checkpointer.load_weights(checkpoint, model)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def build_megatron_model(checkpoint: Path, cfg: ModelConfig):
    model = build_gpt_model(cfg, ParallelConfig(), initialize=False)
    Checkpointer.load_weights(checkpoint, model)
    return model.eval()


def save_megatron_checkpoint(out: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, state: dict) -> Path:
    """A weights-only Megatron checkpoint from full weights (call inside :func:`single_process`)."""
    model = build_gpt_model(cfg, ParallelConfig(), initialize=False)
    expected = dict(model.named_parameters())
    for name, param in expected.items():
        if name not in weights:
            raise ValueError(f"missing tensor {name!r} for the Megatron model")
        if weights[name].shape != param.shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(weights[name].shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(weights[name])
    files = {"model.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)}
    return save_weights_checkpoint(out, model, {"step": 0, **state}, files)
