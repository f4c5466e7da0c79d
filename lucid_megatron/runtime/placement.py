"""Where tensors live: the process's device, batches moved onto it once, and collectives on that device.

An NCCL process group takes only tensors of the process's CUDA device; gloo takes CPU tensors. Every
tensor that goes into a collective in training, evaluation and conversion is therefore made here, on
:attr:`Runtime.device`, and every value read back to the host goes through :meth:`Runtime.host` (one
device-to-host copy per call, the only synchronisation the bookkeeping needs).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from lucid_megatron.data.loader import MicroBatch
from lucid_megatron.model.core_attention import PackedDocuments
from lucid_megatron.parallel.context import split_micro_batch
from lucid_megatron.parallel.plan import AttentionPlan, CpCommType, build_plan
from lucid_megatron.parallel.state import destroy_parallel, initialize_parallel

from .device import default_device


@dataclasses.dataclass(frozen=True)
class Runtime:
    """The process's device and its place in the TP x CP x DP layout (after :func:`start_runtime`)."""

    device: torch.device
    tensor_parallel: int
    context_parallel: int
    sequence_parallel: bool = False
    collective_timeout_s: float = 600.0
    cp_comm_type: CpCommType = "p2p"  # the context-parallel algorithm every micro-batch's plan names
    # Called around every all-reduce to time it (the trainer's step times, train/step_times.py); None: untimed.
    collective_clock: Callable[[], contextlib.AbstractContextManager] | None = dataclasses.field(default=None,
                                                                                                 compare=False)

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.context_parallel)

    @property
    def is_first_rank(self) -> bool:
        return dist.get_rank() == 0

    @property
    def context_parallel_group(self):
        return parallel_state.get_context_parallel_group()

    @classmethod
    def current(cls, *, cp_comm_type: CpCommType = "p2p") -> "Runtime":
        """The runtime of process groups someone else started (Megatron's state must be initialised); Megatron
        does not record the context-parallel algorithm, so the caller names it."""
        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("no parallel state: start it with lucid_megatron.runtime.start_runtime")
        return cls(default_device(), parallel_state.get_tensor_model_parallel_world_size(),
                   parallel_state.get_context_parallel_world_size(), cp_comm_type=cp_comm_type)

    # ---- batches -----------------------------------------------------------------------------

    def micro_batch(self, micro_batch: MicroBatch) -> "PlacedMicroBatch":
        """This rank's share of a packed micro-batch (its zigzag chunks under CP) on the device, with the
        attention plan of its forward.

        The split and the plan need the document boundaries on the host, so they come first; then tokens,
        labels, loss weights, positions and the index map move to the device once (the plan copies the
        boundaries there on first use, for Megatron's RoPE).
        """
        source_positions = None
        cp_rank = 0
        if self.context_parallel > 1:
            multiple = self.tensor_parallel if self.sequence_parallel else 1
            cp_rank = parallel_state.get_context_parallel_rank()
            micro_batch, source_positions = split_micro_batch(micro_batch, self.context_parallel, cp_rank,
                                                              multiple_of=multiple)
        plan = build_plan(micro_batch.cu_seqlens.tolist(), self.device, cp_size=self.context_parallel,
                          cp_rank=cp_rank, cp_comm_type=self.cp_comm_type,
                          source_positions=source_positions)
        moved = {name: getattr(micro_batch, name).to(self.device, non_blocking=True)
                 for name in ("tokens", "labels", "loss_weight", "position_ids")}
        return PlacedMicroBatch(plan=plan, **moved)

    def micro_batches(self, micro_batches: Iterable[MicroBatch]) -> list["PlacedMicroBatch"]:
        return [self.micro_batch(mb) for mb in micro_batches]

    # ---- collectives -------------------------------------------------------------------------

    def tensor(self, values, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A 1-D tensor of ``values`` on the device, ready for a collective."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def all_reduce(self, values: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if values.device != self.device:
            raise RuntimeError(
                f"a collective got a tensor on {values.device}; this process communicates on {self.device}"
            )
        with self.collective_clock() if self.collective_clock is not None else contextlib.nullcontext():
            dist.all_reduce(values, op=op, group=group)
        return values

    def sum_over_data_parallel(self, values: torch.Tensor, *, with_context_parallel: bool = True) -> torch.Tensor:
        group = parallel_state.get_data_parallel_group(with_context_parallel=with_context_parallel)
        return self.all_reduce(values, group=group)

    def any_rank(self, flag: bool | torch.Tensor) -> bool:
        """True on every rank if ``flag`` (a bool, or a one-element device tensor) is true on any rank.

        Collective over the whole world; a device tensor is reduced where it is (one host read in all).
        """
        if isinstance(flag, torch.Tensor):
            values = flag.detach().to(torch.float64).reshape(1)
        else:
            values = self.tensor([float(flag)])
        return bool(self.host(self.all_reduce(values, op=dist.ReduceOp.MAX))[0])

    @contextlib.contextmanager
    def phase(self, name: str):
        """Name what the ranks are doing: a collective that times out (or loses a peer) inside becomes a
        :class:`CollectiveTimeout` naming this rank and ``name``. (gloo raises on the timeout; NCCL's watchdog
        aborts the process instead, and torchrun then names the failed rank.)"""
        try:
            yield
        except Exception as err:
            text = str(err)
            timed_out = "timed out" in text.lower() or "timeout" in text.lower()
            if not (isinstance(err, dist.DistError) or timed_out or "gloo" in text or "NCCL" in text):
                raise
            what = (f"a collective did not complete within {self.collective_timeout_s:g} s (train.collective_timeout_s)"
                    if timed_out else "a collective failed")
            raise CollectiveTimeout(
                f"rank {dist.get_rank()}: {name}: {what}; another rank is stuck or gone "
                f"({type(err).__name__}: {text.splitlines()[0][:200] if text else ''})"
            ) from err

    @staticmethod
    def host(values: torch.Tensor) -> list:
        """Values of a device tensor as a Python list: the bookkeeping's one device-to-host read."""
        return values.tolist()


@dataclasses.dataclass(frozen=True)
class PlacedMicroBatch:
    """A micro-batch ready for the model: this rank's tokens on the device and the plan its attention reads
    (the host-side bookkeeping, stream states and row indices, stays with the loader's :class:`MicroBatch`)."""

    tokens: torch.Tensor  # [1, T_local] int64
    labels: torch.Tensor  # [1, T_local] int64
    loss_weight: torch.Tensor  # [1, T_local] float32
    position_ids: torch.Tensor  # [1, T_local] int64, restarting at 0 in every (padded) document
    plan: AttentionPlan


def packed_seq_params(placed: PlacedMicroBatch) -> PackedDocuments:
    """Megatron's THD parameters for a placed micro-batch: its plan, whose device boundaries fill Megatron's
    ``cu_seqlens_*`` (max_seqlen, the longest document, lets its THD RoPE restart positions per document)."""
    return PackedDocuments.from_plan(placed.plan)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time; the message names the rank and what it was doing."""


def start_runtime(tensor_parallel: int = 1, context_parallel: int = 1, *, sequence_parallel: bool = False,
                  cp_comm_type: CpCommType = "p2p", hierarchical_context_parallel_sizes: list[int] | None = None,
                  seed: int = 1234, device: torch.device | None = None,
                  collective_timeout_s: float = 600.0) -> Runtime:
    """Process groups (NCCL on GPU, gloo on CPU), Megatron's TP/CP/DP groups, seeds, and the device.

    ``cp_comm_type`` (``parallel.cp_comm_type``) goes into the attention plan of every micro-batch; the
    model's attention layers refuse a plan that names another algorithm than the one they were built for.

    ``device`` defaults to :func:`default_device`; the current CUDA device is set to it before any
    group exists, so NCCL and Megatron's ``torch.cuda.current_device()`` agree with it.
    """
    device = default_device() if device is None else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialize_parallel(tensor_parallel, context_parallel, seed=seed, timeout_minutes=collective_timeout_s / 60,
                        hierarchical_context_parallel_sizes=hierarchical_context_parallel_sizes)
    return Runtime(device, tensor_parallel, context_parallel, sequence_parallel, collective_timeout_s, cp_comm_type)


def stop_runtime() -> None:
    destroy_parallel()
