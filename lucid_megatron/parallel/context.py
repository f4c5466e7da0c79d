"""Context parallelism: the zigzag layout, counted collectives, and splitting batches over CP ranks.

Layout (Megatron's load-balanced THD layout): every document of padded length ``P`` (a multiple of
``2 * cp``) is cut into ``2 * cp`` chunks of ``m = P / (2 * cp)`` tokens; CP rank ``r`` holds chunks ``r``
and ``2 * cp - 1 - r`` of every document, in that order, documents one after another.  Causal work is then
balanced: each rank has one early and one late chunk of everything.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from functools import cached_property
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.profiler import record_function

from lucid_megatron.data.loader import MicroBatch


@dataclasses.dataclass(frozen=True)
class ZigzagLayout:
    doc_lengths: tuple[int, ...]  # padded global length of each document, multiples of 2 * cp_size
    cp_size: int
    cp_rank: int
    # index tensors copied to a device, by (name, device): see device_copy
    _on_device: dict[tuple[Hashable, torch.device], torch.Tensor] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of_boundaries(cls, cu_seqlens: Sequence[int], cp_size: int, cp_rank: int) -> "ZigzagLayout":
        """The layout of a row whose (padded, global) document boundaries are ``cu_seqlens``."""
        return cls(tuple(b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])), cp_size, cp_rank)

    def __post_init__(self):
        bad = [n for n in self.doc_lengths if n <= 0 or n % (2 * self.cp_size)]
        if bad:
            raise ValueError(
                f"context parallelism needs document lengths that are positive multiples of 2 x cp "
                f"({2 * self.cp_size}); got {bad[:5]} (pad each document, see split_micro_batch)"
            )

    @property
    def num_chunks(self) -> int:
        return 2 * self.cp_size

    def owner(self, chunk: int) -> int:
        return chunk if chunk < self.cp_size else self.num_chunks - 1 - chunk

    def my_chunks(self, rank: int | None = None) -> tuple[int, int]:
        r = self.cp_rank if rank is None else rank
        return r, self.num_chunks - 1 - r

    def chunk_length(self, doc: int) -> int:
        return self.doc_lengths[doc] // self.num_chunks

    @cached_property
    def local_offsets(self) -> tuple[int, ...]:
        """Start of each document in a rank's local tensor (the same on every rank)."""
        offsets, start = [], 0
        for d in range(len(self.doc_lengths)):
            offsets.append(start)
            start += 2 * self.chunk_length(d)
        return tuple(offsets)

    @property
    def local_length(self) -> int:
        return sum(self.doc_lengths) // self.cp_size

    def piece(self, doc: int, chunk: int) -> tuple[int, int, int]:
        """(owner rank, start, end) of chunk ``chunk`` of document ``doc`` in the owner's local tensor."""
        m = self.chunk_length(doc)
        start = self.local_offsets[doc] + (0 if chunk < self.cp_size else m)
        return self.owner(chunk), start, start + m

    @cached_property
    def local_positions(self) -> torch.Tensor:
        """Global (padded-row) index of each local token of this rank."""
        parts, doc_start = [], 0
        for d, length in enumerate(self.doc_lengths):
            m = self.chunk_length(d)
            for chunk in self.my_chunks():
                parts.append(torch.arange(doc_start + chunk * m, doc_start + (chunk + 1) * m))
            doc_start += length
        return torch.cat(parts)

    @cached_property
    def natural_from_gathered(self) -> torch.Tensor:
        """Indices into the rank-major concatenation of all local tensors that give natural order."""
        index = []
        for d in range(len(self.doc_lengths)):
            for chunk in range(self.num_chunks):
                owner, start, end = self.piece(d, chunk)
                base = owner * self.local_length
                index.append(torch.arange(base + start, base + end))
        return torch.cat(index)

    @cached_property
    def gathered_from_natural(self) -> torch.Tensor:
        return torch.argsort(self.natural_from_gathered)

    def device_copy(self, name: Hashable, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``host`` (an index tensor derived from this layout, known as ``name``) on ``device``, copied once:
        the runtime builds one layout per micro-batch, so every layer of its forward and backward shares
        the copy instead of moving the index to the device on each call."""
        key = (name, torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = host.to(device)
        return self._on_device[key]


# ---- collectives, with the bytes each rank receives counted (for benchmarks) -------------------

comm_bytes: dict[str, int] = defaultdict(int)


def reset_comm_bytes() -> None:
    comm_bytes.clear()


def _count(kind: str, nbytes: int) -> None:
    comm_bytes[kind] += int(nbytes)


def reduce_scatter(parts: list[torch.Tensor], group) -> torch.Tensor:
    """Sum over ranks of ``parts[rank]``: each rank gets its own summed part."""
    size = dist.get_world_size(group)
    first = parts[0]
    out = torch.empty(first.shape, dtype=first.dtype, device=first.device)
    # reduce_scatter_tensor takes the per-rank parts concatenated along dim 0
    dist.reduce_scatter_tensor(out, torch.cat([p.contiguous() for p in parts], dim=0), group=group)
    _count("reduce_scatter", (size - 1) * out.numel() * out.element_size())
    return out


def broadcast_async(x: torch.Tensor, src_rank_in_group: int, group):
    """Asynchronous broadcast from a rank of ``group`` (numbered within the group)."""
    if dist.get_rank(group) != src_rank_in_group:
        _count("broadcast", x.numel() * x.element_size())
    with record_function("lucid::cp_broadcast"):
        return dist.broadcast(x, src=dist.get_global_rank(group, src_rank_in_group), group=group, async_op=True)


class RingPass:
    """Each tensor sent to the next rank of ``group`` and a same-shaped one received from the previous
    (one batched exchange, so NCCL pairs the sends and receives instead of deadlocking on a cycle)."""

    def __init__(self, tensors: list[torch.Tensor], group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        after, before = (dist.get_global_rank(group, (rank + step) % size) for step in (1, -1))
        self._sent = [t.contiguous() for t in tensors]  # kept alive until the exchange completes
        self.received = [torch.empty_like(t) for t in self._sent]
        ops = []
        for out, into in zip(self._sent, self.received):
            ops += [dist.P2POp(dist.isend, out, after, group), dist.P2POp(dist.irecv, into, before, group)]
        with record_function("lucid::cp_ring_send_recv"):  # named in profiler traces (train.profile_steps)
            self._works = dist.batch_isend_irecv(ops)
        _count("ring", sum(t.numel() * t.element_size() for t in self.received))

    def wait(self) -> list[torch.Tensor]:
        with record_function("lucid::cp_ring_wait"):
            for work in self._works:
                work.wait()
        self._sent = []
        return self.received


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` is [size, ...] (one slice per destination rank); returns [size, ...] (one per source)."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    with record_function("lucid::cp_all_to_all"):
        dist.all_to_all_single(out, x, group=group)
    _count("all_to_all", (size - 1) * x[0].numel() * x.element_size())
    return out


# ---- splitting a micro-batch over CP ranks --------------------------------------------------------


class ZigzagShare(NamedTuple):
    """This CP rank's share of a packed micro-batch (see :func:`split_micro_batch`), on the host."""

    micro_batch: MicroBatch  # the local tokens; cu_seqlens/max_seqlen describe the padded global row
    source_positions: torch.Tensor  # int64: each local token's index in the unsplit row, -1 for padding


def split_micro_batch(micro_batch: MicroBatch, cp_size: int, cp_rank: int, *, multiple_of: int = 1) -> ZigzagShare:
    """This CP rank's share of a packed micro-batch in the zigzag layout, and where its tokens came from.

    Each document (segment of ``cu_seqlens``) is padded to a multiple of ``2 * cp_size`` with token 0 of
    loss weight 0; one more padding segment makes the local length a multiple of ``multiple_of`` (the TP
    size under sequence parallelism).  ``cu_seqlens``/``max_seqlen`` then describe the padded *global*
    row, which is what Megatron's THD RoPE and the LUCID core attention expect; the layout follows from
    them (``ZigzagLayout.of_boundaries``).
    """
    bounds = micro_batch.cu_seqlens.tolist()
    unit = 2 * cp_size
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    padded = [-(-n // unit) * unit for n in lengths]
    row_unit = math.lcm(unit, cp_size * multiple_of)
    extra = -sum(padded) % row_unit  # a multiple of 2 * cp_size, like every segment
    if extra:
        padded.append(extra)
        lengths.append(0)
        bounds.append(bounds[-1])
    layout = ZigzagLayout(tuple(padded), cp_size, cp_rank)

    # Index of each padded-row token in the unpadded row (-1: padding), then this rank's tokens.
    source = torch.full((sum(padded),), -1, dtype=torch.long)
    start = 0
    for a, n, p in zip(bounds, lengths, padded):
        source[start : start + n] = torch.arange(a, a + n)
        start += p
    picked = source[layout.local_positions]
    real = picked >= 0
    take = picked.clamp(min=0)

    def local(t: torch.Tensor, fill) -> torch.Tensor:
        values = t.reshape(-1)[take]
        return torch.where(real, values, torch.full_like(values, fill)).reshape(1, -1)

    positions = torch.cat([torch.arange(p) for p in padded])[layout.local_positions]
    share = dataclasses.replace(
        micro_batch,
        tokens=local(micro_batch.tokens, 0),
        labels=local(micro_batch.labels, 0),
        loss_weight=local(micro_batch.loss_weight, 0.0),
        position_ids=positions.reshape(1, -1),
        cu_seqlens=torch.tensor([0, *itertools.accumulate(padded)], dtype=torch.int32),
        max_seqlen=max(padded),
    )
    return ZigzagShare(share, picked)
