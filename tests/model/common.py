"""Shared helpers for the Megatron model tests (single process)."""

import contextlib

import torch

from lucid_megatron.config import ParallelConfig, load_model_config
from lucid_megatron.model.gpt import build_gpt_model
from lucid_megatron.parallel.state import destroy_parallel, initialize_parallel


@contextlib.contextmanager
def single_process_parallel(seed: int = 1234):
    initialize_parallel(1, seed=seed)
    try:
        yield
    finally:
        destroy_parallel()


def tiny_config(**overrides):
    return load_model_config("tiny", overrides)


def build(cfg, parallel=None, **kwargs):
    return build_gpt_model(cfg, parallel or ParallelConfig(), **kwargs)


def batch(vocab, bsz, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (bsz, n + 1), generator=g)
    positions = torch.arange(n).expand(bsz, n)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), positions


def weights_of(model):
    return {name: p for name, p in model.named_parameters()}
