"""Reading and writing Megatron-format checkpoints as full (TP-independent) weights, in one process.

Megatron's distributed checkpoint format reshards on load, so a checkpoint written by any TP/DP/CP
layout loads here into a TP=1 model, and a checkpoint written here loads at any TP.

A checkpoint of a run still training may be removed by its rotation: read it inside ``reading(CHECKPOINT)``
(re-exported from ``lucid_megatron.checkpoint``), which resolves it and holds it for the whole read.  The
loaders below hold it themselves too, so a checkpoint removed before they start is reported as removed, never
as damaged.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from lucid_megatron import atomic
from lucid_megatron.checkpoint import (  # noqa: F401  (read_*, reading, resolve_* re-exported for the converters)
    Checkpointer, read_model_config, read_state, reading, resolve_checkpoint, save_weights_checkpoint)
from lucid_megatron.checkpoint.load_errors import load_errors_explained
from lucid_megatron.config import ModelConfig, to_dict
from lucid_megatron.runtime import Runtime, start_runtime, stop_runtime
from lucid_megatron.runtime.parallelize import build_model, portable_model_config


@contextlib.contextmanager
def single_process():
    """Megatron's parallel state for a world of one (reused if the caller already set one up); yields the
    :class:`Runtime` (its device is this process's GPU when there is one)."""
    owned = not dist.is_initialized()
    runtime = start_runtime(1) if owned else Runtime.current()
    try:
        yield runtime
    finally:
        if owned:
            stop_runtime()


def _on_host() -> Runtime:
    """The current runtime, placed on the CPU: conversion reads and writes weights on the host."""
    return dataclasses.replace(Runtime.current(), device=torch.device("cpu"))


def _load_weights(checkpoint: Path, model) -> None:
    with load_errors_explained(checkpoint):
        Checkpointer.load_weights(checkpoint, model)


def load_megatron_weights(checkpoint: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Full weights by Megatron name (call inside :func:`single_process`)."""
    with reading(checkpoint) as held:
        if not (held / "model").is_dir():
            raise FileNotFoundError(f"{held / 'model'} is missing: no Megatron weights in this checkpoint")
        model = build_model(_on_host(), portable_model_config(cfg), precision="fp32", initialize=False,
                            load=lambda m: _load_weights(held, m))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def build_megatron_model(checkpoint: Path, cfg: ModelConfig, runtime: Runtime | None = None):
    """The checkpoint's model in float32 on ``runtime``'s device (default: the current runtime)."""
    with reading(checkpoint) as held:
        model = build_model(runtime or Runtime.current(), portable_model_config(cfg), precision="fp32",
                            initialize=False, load=lambda m: _load_weights(held, m))
    return model.eval()


def save_megatron_checkpoint(out: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, state: dict) -> Path:
    """A weights-only Megatron checkpoint from full weights (call inside :func:`single_process`)."""
    atomic.check_output_dir(out, label="checkpoint directory")  # before the model is built
    model = build_model(_on_host(), portable_model_config(cfg), precision="fp32", initialize=False)
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
