"""The attention plan: how the attention layers of one forward see a packed row.

The runtime builds one plan per micro-batch (``Runtime.micro_batch``) and Megatron hands it to every
attention layer inside ``packed_seq_params``; a layer given input that did not come from the runtime (a
plain ``PackedSeqParams``, or SBHD) builds the same plan itself with :func:`build_plan`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from functools import cached_property

import torch

from .context import ZigzagLayout

CpCommType = typing.Literal["a2a", "p2p", "a2a+p2p"]
CP_COMM_TYPES: tuple[CpCommType, ...] = typing.get_args(CpCommType)


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionPlan:
    """Document boundaries and, under context parallelism, this rank's share of the row and the algorithm.

    ``cu_seqlens`` are the boundaries of the row's documents (under context parallelism those of the
    padded *global* row, every document a multiple of ``2 * cp`` long) as host integers, which the attention
    layers read without a device-to-host copy; ``cu_seqlens_device`` is the same list on ``device`` for
    Megatron's THD RoPE.  Without context parallelism ``layout``, ``source_positions`` and
    ``cp_comm_type`` are None.
    """

    cu_seqlens: tuple[int, ...]
    device: torch.device
    layout: ZigzagLayout | None = None  # this rank's zigzag share
    # int64 on ``device``: each local token's index in the unsplit, unpadded row, -1 for padding (only when the
    # runtime split the row; evaluation uses it to put predictions back in order)
    source_positions: torch.Tensor | None = None
    cp_comm_type: CpCommType | None = None

    def __post_init__(self):
        bounds = self.cu_seqlens
        if len(bounds) < 2 or bounds[0] != 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must be strictly increasing from 0, got {list(bounds)[:8]}")
        if (self.layout is None) != (self.cp_comm_type is None):
            raise ValueError("a context-parallel plan needs both a zigzag layout and a cp_comm_type "
                             f"(got layout={self.layout}, cp_comm_type={self.cp_comm_type!r})")
        if self.cp_comm_type is not None and self.cp_comm_type not in CP_COMM_TYPES:
            raise ValueError(f"cp_comm_type={self.cp_comm_type!r} is not allowed; allowed: {', '.join(CP_COMM_TYPES)}")
        if self.layout is not None and self.layout.doc_lengths != self.doc_lengths:
            raise ValueError(f"the zigzag layout's documents {self.layout.doc_lengths} are not the plan's "
                             f"{self.doc_lengths}")
        if self.source_positions is not None and self.layout is None:
            raise ValueError("source_positions belong to a context-parallel split; this plan has no layout")

    @property
    def doc_lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))

    @property
    def max_seqlen(self) -> int:
        """The longest document (Megatron's THD RoPE restarts positions per document up to it)."""
        return max(self.doc_lengths)

    @property
    def cp_size(self) -> int:
        return 1 if self.layout is None else self.layout.cp_size

    @cached_property
    def cu_seqlens_device(self) -> torch.Tensor:
        """``cu_seqlens`` as int32 on ``device``: copied on first use (by the runtime, once per micro-batch)."""
        return torch.tensor(self.cu_seqlens, dtype=torch.int32).to(self.device, non_blocking=True)

    def operator_cu_seqlens(self) -> torch.Tensor | None:
        """The boundaries for the single-device operators (``cu_seqlens=``): a host int32 tensor (they read it
        as integers), or None for a row of one document, which the operators then take at any batch size."""
        if len(self.cu_seqlens) == 2:
            return None
        return torch.tensor(self.cu_seqlens, dtype=torch.int32)


def build_plan(cu_seqlens: Sequence[int], device: torch.device, *, cp_size: int = 1, cp_rank: int = 0,
               cp_comm_type: CpCommType | None = None,
               source_positions: torch.Tensor | None = None) -> AttentionPlan:
    """The plan of a row with document boundaries ``cu_seqlens`` (host integers; under context parallelism
    the padded global row) for CP rank ``cp_rank`` of ``cp_size``, running ``cp_comm_type`` (ignored when
    ``cp_size`` is 1).

    ``source_positions`` (the index map of a split, host or device) is moved to ``device``.
    """
    bounds = tuple(int(b) for b in cu_seqlens)
    device = torch.device(device)
    if cp_size == 1:
        if source_positions is not None:
            raise ValueError("source_positions come from a context-parallel split; cp_size is 1")
        return AttentionPlan(bounds, device)
    if cp_comm_type is None:
        raise ValueError(f"context_parallel_size={cp_size} needs a cp_comm_type ({', '.join(CP_COMM_TYPES)})")
    if source_positions is not None:
        source_positions = source_positions.to(device, non_blocking=True)
    return AttentionPlan(bounds, device, ZigzagLayout.of_boundaries(bounds, cp_size, cp_rank), source_positions,
                         cp_comm_type)
