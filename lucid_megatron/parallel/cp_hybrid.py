"""Two-level context parallelism (``cp_comm_type="a2a+p2p"``): heads all-to-all inside a group of ``A``
ranks (a node), the sequence-pipelined solve across the ``P`` groups.

CP rank ``c = p * A + a`` holds its zigzag share of a ``cp = A * P`` layout (Megatron's hierarchical CP
groups: the a2a group is CP ranks ``p*A .. p*A+A-1``, the p2p group CP ranks ``a, A+a, 2A+a, ...``).  The
zigzag chunks of the ``A`` ranks of a group are the runs ``p*A .. p*A+A-1`` and their mirror: after a head
all-to-all inside the group, each rank holds those two runs for ``H / A`` heads, which is exactly a rank's
share of the zigzag layout of size ``P`` whose chunks are the runs.  The p2p operator then runs unchanged
over the ``P`` groups; an index permutation on each side puts the tokens in the order it expects.

Per rank, the p2p part moves ``max(Hkv, A) / A`` KV heads instead of ``Hkv``: the traffic that crosses nodes
is divided by the a2a group size (docs/context-parallel.md has the formulas).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from lucid_megatron.config.parallel import check_a2a_heads
from lucid_megatron.ops.blockwise import DEFAULT_BLOCK_COLS

from .context import ZigzagLayout
from .cp_a2a import HeadsToSequence, SequenceToHeads, replicate_kv_heads
from .cp_p2p import p2p_attention


@functools.lru_cache(maxsize=64)
def _group_layout(layout: ZigzagLayout, a2a_size: int) -> tuple[ZigzagLayout, torch.Tensor]:
    """The size-``P`` zigzag layout of this rank's a2a group, and the indices into the a2a-gathered tensor
    (the group's ranks' local tensors, rank-major) that put its tokens in that layout's local order."""
    groups, group = layout.cp_size // a2a_size, layout.cp_rank // a2a_size
    outer = ZigzagLayout(layout.doc_lengths, groups, group)
    index = []
    for d in range(len(layout.doc_lengths)):
        for run in outer.my_chunks():  # run r = chunks r*A .. r*A+A-1 of the cp-sized layout, in order
            for chunk in range(run * a2a_size, (run + 1) * a2a_size):
                owner, start, end = layout.piece(d, chunk)
                base = (owner - group * a2a_size) * layout.local_length  # the owner's place in the gather
                index.append(torch.arange(base + start, base + end))
    return outer, torch.cat(index)


def hybrid_attention(q, k, v, layout: ZigzagLayout, a2a_group, p2p_group, *, lucid: bool, eps: float,
                     scale: float, sub_chunks: int = 1, backend: str = "auto",
                     block_cols: int = DEFAULT_BLOCK_COLS) -> torch.Tensor:
    """q [B, T_local, Hq, D], k [B, T_local, Hkv, D], v [B, T_local, Hkv, Dv] in the zigzag layout of
    ``layout.cp_size = A * P`` ranks; ``a2a_group`` has ``A`` ranks, ``p2p_group`` ``P``."""
    a2a_size, groups = dist.get_world_size(a2a_group), dist.get_world_size(p2p_group)
    if a2a_size * groups != layout.cp_size:
        raise ValueError(f"a2a group ({a2a_size}) x p2p group ({groups}) != context-parallel size {layout.cp_size}")
    check_a2a_heads(q.shape[2], k.shape[2], a2a_size, "a2a+p2p")
    k, v = replicate_kv_heads(k, v, a2a_size)
    outer, host_index = _group_layout(layout, a2a_size)
    index = layout.device_copy(("a2a group order", a2a_size), host_index, q.device)
    q, k, v = (SequenceToHeads.apply(x, a2a_group).index_select(1, index) for x in (q, k, v))
    out = p2p_attention(q, k, v, outer, p2p_group, lucid=lucid, eps=eps, scale=scale, sub_chunks=sub_chunks,
                        backend=backend, block_cols=block_cols)
    gathered = torch.empty_like(out).index_copy(1, index, out)  # back to the group's rank-major order
    return HeadsToSequence.apply(gathered, a2a_group)
