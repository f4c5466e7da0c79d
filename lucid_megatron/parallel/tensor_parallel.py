"""Assemble full (TP-independent) tensors from tensor-parallel shards.

Megatron marks sharded parameters with ``tensor_model_parallel``, ``partition_dim`` and
``partition_stride``.  With stride ``s`` each rank holds ``s`` interleaved pieces (SwiGLU's fc1 holds
``[gate_r; up_r]``), so the full tensor is ``cat_s(cat_r(piece[r][s]))``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def gather_tensor_parallel(local: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """The full tensor of which ``local`` (``param`` itself, or its gradient) is this rank's shard."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    dim, stride = param.partition_dim, param.partition_stride
    group = parallel_state.get_tensor_model_parallel_group()
    pieces = local.contiguous().chunk(stride, dim=dim)
    full_pieces = []
    for piece in pieces:
        ranks = [torch.empty_like(piece) for _ in range(tp)]
        dist.all_gather(ranks, piece.contiguous(), group=group)
        full_pieces.append(torch.cat(ranks, dim=dim))
    return torch.cat(full_pieces, dim=dim)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> snapshot of the full parameter (collective: every TP rank must call it)."""
    return {n: gather_tensor_parallel(p.detach(), p).clone() for n, p in model.named_parameters()}


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> snapshot of the full gradient (collective: every TP rank must call it)."""
    return {
        n: gather_tensor_parallel(p.grad, p).clone() for n, p in model.named_parameters() if p.grad is not None
    }
