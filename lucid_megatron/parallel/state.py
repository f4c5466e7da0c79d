"""Start and stop torch.distributed plus Megatron's model-parallel groups, on CPU (gloo) or GPU (nccl)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from .cpu_shim import apply_cpu_shim

_ADDED_ENVIRONMENT: set[str] = set()  # variables initialize_parallel set for a world of one


def initialize_parallel(
    tensor_parallel_size: int = 1,
    context_parallel_size: int = 1,
    *,
    hierarchical_context_parallel_sizes: list[int] | None = None,
    seed: int = 1234,
    timeout_minutes: float = 10,
) -> None:
    """Initialise the default process group (if needed), Megatron's groups and the RNG streams.

    Uses the torchrun environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) when present; a
    process started without it becomes a world of one.  ``hierarchical_context_parallel_sizes`` ([a2a group
    size, number of groups], cp_comm_type a2a+p2p) adds Megatron's two-level CP groups.  Seeds every rank's
    CPU and device generators with ``seed`` so that initialisation is identical across ranks and TP sizes.
    """
    apply_cpu_shim()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend, timeout=timeout)
        else:
            if "LOCAL_RANK" not in os.environ:  # DeepSpeed insists on it even for one process; removed again by
                os.environ["LOCAL_RANK"] = "0"  # destroy_parallel, or later subprocesses think torchrun started them
                _ADDED_ENVIRONMENT.add("LOCAL_RANK")
            dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore(), timeout=timeout)
    world = dist.get_world_size()
    if world % (tensor_parallel_size * context_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel_size ({tensor_parallel_size}) x "
            f"context_parallel_size ({context_parallel_size})"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        hierarchical_context_parallel_sizes=(hierarchical_context_parallel_sizes if context_parallel_size > 1
                                             else None),
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=False,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    while _ADDED_ENVIRONMENT:
        os.environ.pop(_ADDED_ENVIRONMENT.pop(), None)
