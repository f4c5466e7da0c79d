"""One optimizer step over micro-batches, and a validation pass, on a DeepSpeed engine.

Loss normalisation makes every layout compute the same update: the loss of a step is
``sum over the global batch of (per-token loss x weight) / (total weight of the global batch)``.
Each rank scales its local sum so that DeepSpeed's average over the data x context parallel group
turns the sum of local gradients into that global mean, whatever the DP size, CP size and number
of micro-batches.

Micro-batches arrive placed (:class:`PlacedMicroBatch`: this rank's share on the runtime's device, with
the attention plan of its forward, from ``Runtime.micro_batch``); every tensor that enters a collective is
made on that device by the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch.profiler import record_function
from megatron.core import parallel_state

from lucid_megatron.data.loader import MicroBatch
from lucid_megatron.runtime import Runtime
from lucid_megatron.runtime.placement import PlacedMicroBatch, packed_seq_params


@dataclasses.dataclass
class StepResult:
    loss: float  # mean weighted loss over the global batch (nan if the step was skipped)
    tokens: int  # weighted tokens in the global batch
    grad_norm: float | None
    skipped: bool  # every micro-batch was non-finite: no update
    nonfinite_micro_batches: int


def _untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def micro_batch_loss_sum(model, micro_batch: PlacedMicroBatch) -> torch.Tensor:
    """Sum over the micro-batch of per-token cross-entropy x loss weight (float32 scalar on the device)."""
    per_token = model(
        micro_batch.tokens, micro_batch.position_ids, None, labels=micro_batch.labels,
        packed_seq_params=packed_seq_params(micro_batch),
    )
    return (per_token.float() * micro_batch.loss_weight).sum()


def train_step(engine, runtime: Runtime, micro_batches: list[PlacedMicroBatch], lr: float,
               section: Callable[[str], contextlib.AbstractContextManager] = _untimed) -> StepResult:
    """One optimizer step over this rank's (placed) micro-batches of the global batch.

    A micro-batch whose loss is non-finite on any rank is dropped (no backward) on every rank;
    if all of them are, the step is skipped (no optimizer update, no state change).  ``section(name)`` times
    the ``compute`` and ``optimizer`` parts (train/step_times.py).
    """
    with section("compute"):
        weights = torch.stack([mb.loss_weight.sum(dtype=torch.float64) for mb in micro_batches]).sum().reshape(1)
        total_weight = runtime.host(runtime.sum_over_data_parallel(weights.to(runtime.device)))[0]
        dp_cp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
        scale = dp_cp / max(total_weight, 1.0)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=runtime.device)
        nonfinite = 0
        for mb in micro_batches:
            with record_function("lucid::forward"):  # named in profiler traces (train.profile_steps)
                local = micro_batch_loss_sum(engine, mb)
            if runtime.any_rank(~torch.isfinite(local)):
                nonfinite += 1  # every rank takes the same branch
                continue
            with record_function("lucid::backward"):
                engine.backward(local * scale, scale_wrt_gas=False)
            loss_sum += local.detach().to(torch.float64)
    skipped = nonfinite == len(micro_batches)
    grad_norm = None
    if not skipped:
        with section("optimizer"), record_function("lucid::deepspeed_step"):
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = None if norm is None else float(norm)
    with section("compute"):  # the step's loss: a collective, so that its wait is in a section
        loss_total = runtime.host(runtime.sum_over_data_parallel(loss_sum))[0]
    loss = float("nan") if nonfinite else loss_total / max(total_weight, 1.0)
    return StepResult(loss, int(total_weight), grad_norm, skipped, nonfinite)


@torch.no_grad()
def evaluate(engine, runtime: Runtime, micro_batches: Iterable[PlacedMicroBatch],
             padding: PlacedMicroBatch) -> tuple[float, int]:
    """Weighted mean loss over this rank's (placed) share of the validation rows, reduced over DP x CP.

    Every rank runs the same number of forward passes, topping up with ``padding`` (a placed micro-batch of
    loss weight 0) where it has fewer rows: under ZeRO-3 each forward gathers the weights collectively, so a
    rank that ran out of rows would leave the others waiting forever.
    """
    batches = list(micro_batches)
    count = int(runtime.host(runtime.all_reduce(runtime.tensor([len(batches)]), op=dist.ReduceOp.MAX))[0])
    was_training = engine.module.training
    engine.module.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for mb in batches + [padding] * (count - len(batches)):
        totals[0] += micro_batch_loss_sum(engine, mb).to(torch.float64)
        totals[1] += mb.loss_weight.sum(dtype=torch.float64)
    engine.module.train(was_training)
    loss, weight = runtime.host(runtime.sum_over_data_parallel(totals))
    return loss / max(weight, 1.0), int(weight)


def rows_digest(runtime: Runtime, micro_batches: list[MicroBatch], seq_length: int) -> int:
    """Order-independent fingerprint of the rows of a step, summed over data-parallel ranks.

    Computed from the loader's host tensors (before placement): proves which data ran, costs no device copy.
    """
    total = 0
    for mb in micro_batches:
        for row in mb.tokens.reshape(-1, seq_length):
            total += zlib.crc32(row.numpy().tobytes())
    reduced = runtime.sum_over_data_parallel(runtime.tensor([total], torch.int64), with_context_parallel=False)
    return int(runtime.host(reduced)[0])
