"""Rank functions for the tensor/sequence-parallel tests (importable by spawned processes)."""

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from lucid_megatron.config import ParallelConfig
from lucid_megatron.parallel.state import initialize_parallel
from lucid_megatron.parallel.tensor_parallel import full_gradients, full_parameters

from .common import batch, build, tiny_config

SGD_STEPS = 5


def train_tiny(rank, world_size, sequence_parallel, overrides):
    """Build the tiny model at TP=world_size, run fwd/bwd and SGD steps; rank 0 returns the results."""
    initialize_parallel(tensor_parallel_size=world_size)
    cfg = tiny_config(**overrides)
    model = build(cfg, ParallelConfig(tensor_parallel_size=world_size, sequence_parallel=sequence_parallel))
    initial = full_parameters(model)
    tokens, labels, positions = batch(cfg.vocab_size, 2, 48)
    logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    loss = model(tokens, positions, None, labels=labels)
    loss.mean().backward()
    grads = full_gradients(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = [loss.mean().item()]
    for _ in range(SGD_STEPS):
        optimizer.step()
        optimizer.zero_grad()
        step_loss = model(tokens, positions, None, labels=labels).mean()
        step_loss.backward()
        losses.append(step_loss.item())
    if rank != 0:
        return None
    return dict(initial=initial, logits=logits.detach(), loss=loss.detach(), grads=grads, losses=losses)
