"""DeepSpeed ZeRO over Megatron's parallel groups, and one optimizer step over micro-batches.

Loss normalisation makes every layout compute the same update: the loss of a step is
``sum over the global batch of (per-token loss x weight) / (total weight of the global batch)``.
Each rank scales its local sum so that DeepSpeed's average over the data x context parallel group
turns the sum of local gradients into that global mean, whatever the DP size, CP size and number
of micro-batches.
"""

from __future__ import annotations

import dataclasses

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams


class MegatronMPU:
    """What DeepSpeed calls ``mpu``, backed by Megatron's parallel state.

    DeepSpeed's "model parallel" is Megatron's *tensor* parallel (valid for PP=1), and its data
    parallel group is Megatron's data-parallel group *including* context-parallel ranks, so ZeRO
    partitions and gradients are averaged over data x context ranks.  Without an mpu, DeepSpeed
    would silently treat TP ranks as data-parallel replicas (see shared/FACTS.md).
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


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, zero_stage: int, grad_clip: float,
                     bf16: bool) -> dict:
    dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    return {
        # DeepSpeed's batch bookkeeping counts context-parallel ranks as replicas.
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp_cp,
        # We call backward() per micro-batch and step() once per optimizer step.
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_engine(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, ds_config: dict):
    """A DeepSpeed engine around ``model`` with torch's AdamW (no fused-Adam build on CPU).

    Norm weights get no weight decay (the usual Llama recipe); everything else does.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() == 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=MegatronMPU())
    return engine


@dataclasses.dataclass
class StepResult:
    loss: float  # mean weighted loss over the global batch (nan if the step was skipped)
    tokens: int  # weighted tokens in the global batch
    grad_norm: float | None
    skipped: bool  # every micro-batch was non-finite: no update
    nonfinite_micro_batches: int


def packed_seq_params(micro_batch) -> PackedSeqParams:
    """THD boundaries of the (padded, under CP: global) row; max_seqlen is the longest document, which
    Megatron's THD RoPE needs to restart positions per document."""
    cu = micro_batch.cu_seqlens
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
        max_seqlen_q=micro_batch.max_seqlen, max_seqlen_kv=micro_batch.max_seqlen,
    )


def micro_batch_loss_sum(model, micro_batch) -> torch.Tensor:
    """Sum over the micro-batch of per-token cross-entropy x loss weight (float32 scalar)."""
    per_token = model(
        micro_batch.tokens, micro_batch.position_ids, None, labels=micro_batch.labels,
        packed_seq_params=packed_seq_params(micro_batch),
    )
    return (per_token.float() * micro_batch.loss_weight).sum()


def _dp_cp_sum(value: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return value


def train_step(engine, micro_batches: list, lr: float) -> StepResult:
    """One optimizer step over this rank's micro-batches of the global batch.

    A micro-batch whose loss is non-finite on any rank is dropped (no backward) on every rank;
    if all of them are, the step is skipped (no optimizer update, no state change).
    """
    weights = torch.tensor([float(mb.loss_weight.sum()) for mb in micro_batches]).sum().reshape(1)
    total_weight = _dp_cp_sum(weights.to(torch.float64))
    dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    scale = dp_cp / max(total_weight.item(), 1.0)
    loss_sum = torch.zeros(1, dtype=torch.float64)
    nonfinite = 0
    for mb in micro_batches:
        local = micro_batch_loss_sum(engine, mb)
        bad = torch.tensor([0.0 if torch.isfinite(local) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank must take the same branch
        if bad.item():
            nonfinite += 1
            continue
        engine.backward(local * scale, scale_wrt_gas=False)
        loss_sum += local.detach().to(torch.float64)
    skipped = nonfinite == len(micro_batches)
    grad_norm = None
    if not skipped:
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        engine.step()
        norm = engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
    _dp_cp_sum(loss_sum)
    loss = float("nan") if nonfinite else loss_sum.item() / max(total_weight.item(), 1.0)
    return StepResult(loss, int(total_weight.item()), grad_norm, skipped, nonfinite)


@torch.no_grad()
def evaluate(engine, micro_batches) -> tuple[float, int]:
    """Weighted mean loss over this rank's share of the validation rows, reduced over DP x CP."""
    was_training = engine.module.training
    engine.module.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for mb in micro_batches:
        totals[0] += micro_batch_loss_sum(engine, mb).to(torch.float64)
        totals[1] += float(mb.loss_weight.sum())
    engine.module.train(was_training)
    _dp_cp_sum(totals)
    return totals[0].item() / max(totals[1].item(), 1.0), int(totals[1].item())
