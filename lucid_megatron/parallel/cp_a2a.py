"""Head-parallel context parallelism (``cp_comm_type="a2a"``, Ulysses-style) for LUCID and softmax.

An all-to-all turns sequence-sharded tensors (each CP rank: its zigzag share of every document, all
heads) into head-sharded ones (each rank: the whole sequence, ``heads / cp`` heads); the zigzag order
is undone, the ordinary single-device operator runs (exact, memory-linear), and the same steps run in
reverse.  KV heads are replicated first when there are fewer of them than CP ranks.
"""

from __future__ import annotations

import itertools

import torch

from lucid_megatron.config.parallel import check_a2a_heads
from lucid_megatron.ops import lucid_attention, softmax_attention

from .context import ZigzagLayout, all_to_all


class SequenceToHeads(torch.autograd.Function):
    """[B, T_local, H, D] on each rank -> [B, cp * T_local, H / cp, D] (rank-major sequence)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x, group):
    size = torch.distributed.get_world_size(group)
    b, t, h, d = x.shape
    send = x.reshape(b, t, size, h // size, d).permute(2, 0, 1, 3, 4)  # [dest, B, T, H/c, D]
    recv = all_to_all(send, group)  # [source, B, T, H/c, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, size * t, h // size, d)


def _heads_to_seq(x, group):
    size = torch.distributed.get_world_size(group)
    b, st, hc, d = x.shape
    send = x.reshape(b, size, st // size, hc, d).permute(1, 0, 2, 3, 4)  # [dest, B, T, H/c, D]
    recv = all_to_all(send, group)  # [source head group, B, T, H/c, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, st // size, size * hc, d)


def replicate_kv_heads(k, v, a2a_size: int):
    """With fewer KV heads than all-to-all ranks, each rank gets a copy of the one its query heads use."""
    hkv = k.shape[2]
    if hkv % a2a_size == 0:
        return k, v
    return k.repeat_interleave(a2a_size // hkv, dim=2), v.repeat_interleave(a2a_size // hkv, dim=2)


def a2a_attention(q, k, v, layout: ZigzagLayout, group, *, lucid: bool, eps: float, scale: float,
                  backend: str = "auto") -> torch.Tensor:
    """q [B, T_local, Hq, D], k [B, T_local, Hkv, D], v [B, T_local, Hkv, Dv] in the zigzag layout."""
    check_a2a_heads(q.shape[2], k.shape[2], layout.cp_size)
    k, v = replicate_kv_heads(k, v, layout.cp_size)
    natural = layout.device_copy("natural_from_gathered", layout.natural_from_gathered, q.device)
    q, k, v = (SequenceToHeads.apply(x, group).index_select(1, natural) for x in (q, k, v))
    # The operators read boundaries as host integers: a host tensor, so no device-to-host copy per call.
    cu = None
    if len(layout.doc_lengths) > 1:
        cu = torch.tensor([0, *itertools.accumulate(layout.doc_lengths)], dtype=torch.int32)
    if lucid:
        out = lucid_attention(q, k, v, cu_seqlens=cu, eps=eps, softmax_scale=scale, backend=backend)
    else:
        out = softmax_attention(q, k, v, cu_seqlens=cu, softmax_scale=scale)
    gathered = layout.device_copy("gathered_from_natural", layout.gathered_from_natural, q.device)
    return HeadsToSequence.apply(out.index_select(1, gathered), group)
