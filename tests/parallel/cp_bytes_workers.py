"""Rank function for the received-bytes test (importable by spawned processes)."""

import torch.distributed as dist

from lucid_megatron.parallel import context
from lucid_megatron.parallel.context import ZigzagLayout
from lucid_megatron.parallel.cp_a2a import a2a_attention
from lucid_megatron.parallel.cp_hybrid import hybrid_attention
from lucid_megatron.parallel.cp_p2p import p2p_attention

from .cp_workers import full_inputs, hierarchical_groups


def cp_bytes_rank(rank, world_size, cases, doc_lengths, hq, hkv, d, dtype, a2a_size):
    """Bytes this rank receives, by collective kind, in one LUCID forward+backward for each (mode, cp) of
    ``cases``.  CP = world size runs on all ranks; a smaller CP on the hierarchical a2a groups (consecutive
    ranks), each an independent context-parallel instance, so one spawn serves every case."""
    dist.init_process_group("gloo")
    a2a_group, p2p_group = hierarchical_groups(world_size, a2a_size)
    counted = {}
    for mode, cp in cases:
        group = dist.group.WORLD if cp == world_size else a2a_group
        assert dist.get_world_size(group) == cp, f"no group of {cp} ranks here (a2a groups: {a2a_size})"
        layout = ZigzagLayout(tuple(doc_lengths), cp, dist.get_rank(group))
        pos = layout.local_positions
        q, k, v, grad_out = full_inputs(1, doc_lengths, hq, hkv, d, d, dtype)
        leaves = [x[:, pos].clone().requires_grad_() for x in (q, k, v)]
        options = dict(lucid=True, eps=1e-6, scale=d**-0.5)
        context.reset_comm_bytes()
        if mode == "a2a":
            out = a2a_attention(*leaves, layout, group, **options)
        elif mode == "p2p":
            out = p2p_attention(*leaves, layout, group, block_cols=16, **options)
        else:
            out = hybrid_attention(*leaves, layout, a2a_group, p2p_group, block_cols=16, **options)
        out.backward(grad_out[:, pos])
        counted[mode, cp] = dict(context.comm_bytes)
    return counted
