"""Rank functions for the context-parallel operator tests (importable by spawned processes)."""

import torch
import torch.distributed as dist

from lucid_megatron.parallel.context import ZigzagLayout
from lucid_megatron.parallel.cp_a2a import a2a_attention
from lucid_megatron.parallel.cp_hybrid import hybrid_attention
from lucid_megatron.parallel.cp_p2p import p2p_attention


def full_inputs(batch, doc_lengths, hq, hkv, d, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(doc_lengths)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(batch, n, hq, d), make(batch, n, hkv, d), make(batch, n, hkv, dv), make(batch, n, hq, dv)


def cp_attention_rank(rank, world_size, mode, lucid, batch, doc_lengths, hq, hkv, d, dv, dtype, sub_chunks,
                      backend="auto"):
    """Run one CP attention on this rank's zigzag share; return its output and input gradients."""
    dist.init_process_group("gloo")
    layout = ZigzagLayout(tuple(doc_lengths), world_size, rank)
    q, k, v, grad_out = full_inputs(batch, doc_lengths, hq, hkv, d, dv, dtype)
    pos = layout.local_positions
    leaves = [x[:, pos].clone().requires_grad_() for x in (q, k, v)]
    scale = d**-0.5 * 0.9
    if mode == "a2a":
        out = a2a_attention(*leaves, layout, dist.group.WORLD, lucid=lucid, eps=1e-6, scale=scale, backend=backend)
    else:
        out = p2p_attention(*leaves, layout, dist.group.WORLD, lucid=lucid, eps=1e-6, scale=scale,
                            sub_chunks=sub_chunks, block_cols=16, backend=backend)
    out.backward(grad_out[:, pos])
    return dict(positions=pos, out=out.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)


def hierarchical_groups(world_size: int, a2a_size: int):
    """This rank's (a2a group, p2p group) laid out as Megatron's hierarchical CP groups: consecutive ranks
    inside, strided across (every rank creates every group, in the same order)."""
    rank, mine = dist.get_rank(), {}
    for start in range(0, world_size, a2a_size):
        ranks = list(range(start, start + a2a_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["a2a"] = group
    for offset in range(a2a_size):
        ranks = list(range(offset, world_size, a2a_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine["p2p"] = group
    return mine["a2a"], mine["p2p"]


def cp_hybrid_rank(rank, world_size, a2a_size, variants, cases, dtype):
    """The a2a+p2p operator for each (lucid, sub_chunks) of ``variants`` on each of ``cases`` (batch, doc_lengths,
    hq, hkv, d, dv): outputs and input gradients, by variant then case (one spawn for all: spawning is the cost)."""
    dist.init_process_group("gloo")
    a2a_group, p2p_group = hierarchical_groups(world_size, a2a_size)
    results = []
    for lucid, sub_chunks in variants:
        for batch, doc_lengths, hq, hkv, d, dv in cases:
            layout = ZigzagLayout(tuple(doc_lengths), world_size, rank)
            q, k, v, grad_out = full_inputs(batch, doc_lengths, hq, hkv, d, dv, dtype)
            pos = layout.local_positions
            leaves = [x[:, pos].clone().requires_grad_() for x in (q, k, v)]
            out = hybrid_attention(*leaves, layout, a2a_group, p2p_group, lucid=lucid, eps=1e-6,
                                   scale=d**-0.5 * 0.9, sub_chunks=sub_chunks, block_cols=16)
            out.backward(grad_out[:, pos])
            results.append(dict(positions=pos, out=out.detach(), dq=leaves[0].grad, dk=leaves[1].grad,
                                dv=leaves[2].grad))
    return results


def cp_model_rank(rank, world_size, cp_comm_type, tp, overrides, doc_lengths):
    """Tiny GPT at CP = world_size / tp on a packed row: weighted loss sum and CP-summed full gradients."""
    from megatron.core import parallel_state

    from lucid_megatron.config import ParallelConfig
    from lucid_megatron.data.loader import MicroBatch
    from lucid_megatron.parallel.state import initialize_parallel
    from lucid_megatron.parallel.tensor_parallel import full_gradients
    from lucid_megatron.runtime import Runtime
    from lucid_megatron.train.engine import micro_batch_loss_sum
    from tests.model.common import build, tiny_config

    cp = world_size // tp
    # a2a+p2p: head all-to-all inside pairs of CP ranks, the pipelined solve across the pairs
    sizes = [2, cp // 2] if cp_comm_type == "a2a+p2p" else None
    initialize_parallel(tensor_parallel_size=tp, context_parallel_size=cp, hierarchical_context_parallel_sizes=sizes)
    cfg = tiny_config(**overrides)
    model = build(cfg, ParallelConfig(tensor_parallel_size=tp, context_parallel_size=cp, cp_comm_type=cp_comm_type,
                                      sequence_parallel=tp > 1, hierarchical_context_parallel_sizes=sizes))
    g = torch.Generator().manual_seed(7)
    n = sum(doc_lengths)
    tokens = torch.randint(0, cfg.vocab_size, (1, n + 1), generator=g)
    weights = (torch.rand(1, n, generator=g) > 0.2).float()
    cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)
    mb = MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_weight=weights,
                    position_ids=torch.cat([torch.arange(m) for m in doc_lengths])[None], cu_seqlens=cu,
                    max_seqlen=max(doc_lengths), num_rows=1, stream_states={})
    runtime = Runtime(torch.device("cpu"), tp, cp, sequence_parallel=tp > 1, cp_comm_type=cp_comm_type)
    loss = micro_batch_loss_sum(model, runtime.micro_batch(mb))  # under CP: the zigzag split and its plan
    loss.backward()
    cp_group = parallel_state.get_context_parallel_group()
    total = loss.detach().reshape(1).clone()
    dist.all_reduce(total, group=cp_group)
    for p in model.parameters():
        dist.all_reduce(p.grad, group=cp_group)
    grads = full_gradients(model)
    return dict(loss=total.item(), grads=grads) if rank == 0 else None
