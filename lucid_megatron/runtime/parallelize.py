"""Model and engine for a runtime: precision, layer spec, TP/SP/CP, activation checkpointing, DeepSpeed ZeRO.

Composition in one place, as torchtitan's ``parallelize_*`` does it: :func:`build_model` turns the model
config into a Megatron-Core GPT on the runtime's device (tensor, sequence and context parallelism come from
Megatron's groups and our core attention), :func:`build_engine` wraps it in DeepSpeed over Megatron's
groups.  ``lucid train`` uses both; ``lucid eval`` and ``lucid convert verify`` use :func:`build_model`.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state

from lucid_megatron.config import ModelConfig, ParallelConfig
from lucid_megatron.model.gpt import build_gpt_model
from lucid_megatron.model.specs import transformer_engine_import_error
from lucid_megatron.parallel.cpu_shim import apply_cpu_shim

from .device import PRECISIONS, SPECS, check_spec, params_dtype  # noqa: F401  (re-exported: callers import them here)
from .placement import Runtime

def portable_model_config(model: ModelConfig) -> ModelConfig:
    """``model`` with the local spec where Transformer Engine is missing (for evaluation and conversion).

    Both specs store the same checkpoint (same tensors, same names), so a run trained with ``te`` loads
    into local layers; the local layers compute the same function (not bit for bit the same kernels).
    """
    if model.spec == "te" and transformer_engine_import_error() is not None:
        return dataclasses.replace(model, spec="local")
    return model


def build_model(runtime: Runtime, model: ModelConfig, parallel: ParallelConfig | None = None, *,
                precision: str = "auto", attention_backend: str = "auto", activation_checkpointing: bool = False,
                initialize: bool = True, load=None) -> torch.nn.Module:
    """The GPT model of ``model`` for the runtime's layout, with its weights on ``runtime.device``.

    Weights are drawn on the CPU (identical for every TP size), optionally replaced by ``load(model)``
    (a checkpoint, before any engine partitions them), then moved to the device once.
    """
    parallel = parallel or ParallelConfig(tensor_parallel_size=runtime.tensor_parallel,
                                          context_parallel_size=runtime.context_parallel,
                                          sequence_parallel=runtime.sequence_parallel)
    check_spec(model.spec)
    gpt = build_gpt_model(
        model, parallel, transformer_engine=model.spec == "te", attention_backend=attention_backend,
        params_dtype=params_dtype(precision, runtime.device), initialize=initialize,
        recompute_activations=activation_checkpointing,
    )
    if load is not None:
        load(gpt)
    return gpt.to(runtime.device)


class MegatronMPU:
    """What DeepSpeed calls ``mpu``, backed by Megatron's parallel state.

    DeepSpeed's "model parallel" is Megatron's *tensor* parallel (valid for PP=1), and its data
    parallel group is Megatron's data-parallel group *including* context-parallel ranks, so ZeRO
    partitions and gradients are averaged over data x context ranks.  Without an mpu, DeepSpeed
    silently treats TP ranks as data-parallel replicas (docs/training.md, "Engine").
    """

    def get_model_parallel_rank(self):
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self):
        return parallel_state.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self):
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)

    def __getattr__(self, name):
        return getattr(parallel_state, name)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    micro_batch_size: int
    grad_accum: int
    zero_stage: int
    grad_clip: float
    bf16: bool
    allow_untested_deepspeed: bool = False


def deepspeed_config(options: EngineOptions) -> dict:
    dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    return {
        # DeepSpeed's batch bookkeeping counts context-parallel ranks as replicas.
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": options.grad_accum,
        "train_batch_size": options.micro_batch_size * options.grad_accum * dp_cp,
        # We call backward() per micro-batch and step() once per optimizer step.
        "managed_gradient_accumulation": False,
        "gradient_clipping": options.grad_clip,
        "zero_optimization": {"stage": options.zero_stage},
        # bf16: DeepSpeed keeps fp32 master weights (and optimizer state) for the bf16 model.
        "bf16": {"enabled": options.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, options: EngineOptions):
    """A DeepSpeed engine around ``model`` (already on its device) with torch's AdamW (no fused-Adam build).

    Norm weights get no weight decay (the usual Llama recipe); everything else does.
    """
    import deepspeed

    from . import deepspeed_adapter

    deepspeed_adapter.check_version(options.allow_untested_deepspeed)
    apply_cpu_shim(deepspeed=True)  # no CUDA: DeepSpeed must not compile an op training never uses
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": options.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=options.betas, eps=options.eps, foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(options),
                                           mpu=MegatronMPU())
    deepspeed_adapter.check_engine(engine)  # what checkpoints will read is there, before any step
    return engine
