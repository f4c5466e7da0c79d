"""Sequence-pipelined context parallelism (``cp_comm_type="p2p"``) for LUCID and softmax.

The sequence stays sharded in the zigzag layout.  Every document's ``2 * cp`` chunks (each optionally cut
into ``sub_chunks`` pipeline units) are solved in causal order: the owner of unit ``t`` finishes
``V'_t = L_tt^{-1} (V_t - sum_{u<t} L_tu V'_u)`` and broadcasts it; every rank then subtracts
``L_jt V'_t`` from the accumulators of its own later units.  The update of the *next* unit is done first
and the next broadcast is posted before the remaining updates, so communication overlaps computation.
Normalised keys are all-gathered up front (they have no dependency).  The softmax part attends from the
local chunks to the all-gathered keys and the (by then complete) V', a non-causal prefix and a causal
diagonal chunk merged by log-sum-exp.  The backward runs the same pipeline in reverse for ``dV = L^{-T} G``
and reduce-scatters the key/value gradients that land on other ranks' chunks.

Per rank this holds O(N d) of gathered keys and values (N: the whole sequence), which GQA keeps small;
see docs/context-parallel.md for communication volume and critical path.
"""

from __future__ import annotations

import torch

from lucid_megatron.ops.attention import resolve_backend
from lucid_megatron.ops.blockwise import DEFAULT_BLOCK_COLS, compute_dtype, rms_normalize
from lucid_megatron.ops.flash_blocks import attention_backward, attention_with_lse, merge
from lucid_megatron.ops.solver import Solver, make_solver

from .context import ZigzagLayout, all_gather, broadcast_async, reduce_scatter


class _Units:
    """Pipeline units: chunk ``k`` of every document, cut into ``s`` sub-chunks, in causal order."""

    def __init__(self, layout: ZigzagLayout, sub_chunks: int):
        self.layout, self.s = layout, sub_chunks
        self.count = layout.num_chunks * sub_chunks
        # pieces[t] = [(doc, start, end) in the owner's local tensor], one per document (maybe empty)
        self.pieces = []
        for t in range(self.count):
            chunk, sub = divmod(t, sub_chunks)
            parts = []
            for d in range(len(layout.doc_lengths)):
                _, start, end = layout.piece(d, chunk)
                bounds = torch.linspace(start, end, sub_chunks + 1).round().long().tolist()
                parts.append((d, bounds[sub], bounds[sub + 1]))
            self.pieces.append(parts)

    def owner(self, t: int) -> int:
        return self.layout.owner(t // self.s)

    def mine(self) -> list[int]:
        return [t for t in range(self.count) if self.owner(t) == self.layout.cp_rank]

    def pack(self, tensor: torch.Tensor, t: int) -> torch.Tensor:
        """Unit ``t``'s pieces of a local [G, T, X] tensor, concatenated along T."""
        return torch.cat([tensor[:, a:b] for _, a, b in self.pieces[t]], dim=1)

    def unpack(self, buffer: torch.Tensor, tensor: torch.Tensor, t: int) -> None:
        offset = 0
        for _, a, b in self.pieces[t]:
            tensor[:, a:b] = buffer[:, offset : offset + b - a]
            offset += b - a

    def size(self, t: int) -> int:
        return sum(b - a for _, a, b in self.pieces[t])


def _pipeline_forward(kn_all, v_local, units: _Units, group, solver: Solver):
    """V' of every rank's chunks (list by rank, local layout) by the broadcast pipeline."""
    layout, me = units.layout, units.layout.cp_rank
    g, _, dv = v_local.shape
    dtype = kn_all[0].dtype
    device = v_local.device
    vp_all = [torch.empty(g, layout.local_length, dv, dtype=dtype, device=device) for _ in range(layout.cp_size)]
    acc = v_local.to(dtype, copy=True)  # my units' accumulators, in place in the local layout
    mine = units.mine()

    def update(j: int, t: int) -> None:  # acc_j -= L[j, t] V'_t, document by document
        src = units.owner(t)
        for (d, a, b), (_, c0, c1) in zip(units.pieces[j], units.pieces[t]):
            if c1 > c0 and b > a:
                solver.subtract_earlier(acc[:, a:b], kn_all[me][:, a:b], kn_all[src][:, c0:c1], vp_all[src][:, c0:c1])

    def solve(t: int) -> None:
        for _, a, b in units.pieces[t]:
            if b > a:
                vp_all[me][:, a:b] = solver.solve(kn_all[me][:, a:b], acc[:, a:b], [(0, b - a)])

    def post(t: int):
        src = units.owner(t)
        buf = units.pack(vp_all[me], t) if src == me else torch.empty(g, units.size(t), dv, dtype=dtype, device=device)
        return buf, broadcast_async(buf, src, group)

    if units.owner(0) == me:
        solve(0)
    pending = post(0)
    for t in range(units.count):
        buf, handle = pending
        handle.wait()
        if units.owner(t) != me:
            units.unpack(buf, vp_all[units.owner(t)], t)
        nxt = t + 1
        if nxt < units.count:
            if units.owner(nxt) == me:  # the critical path: finish the next unit first
                update(nxt, t)
                solve(nxt)
            pending = post(nxt)
        for j in mine:
            if j > nxt:
                update(j, t)
    return vp_all


def _pipeline_backward(kn_all, vp_all, grad_local, units: _Units, group, solver: Solver):
    """dV (local) and dKn (local, all contributions) of V' = L^{-1} V, by the reverse pipeline."""
    layout, me = units.layout, units.layout.cp_rank
    g, n_local, dv = grad_local.shape
    dtype = kn_all[0].dtype
    acc = grad_local.to(dtype, copy=True)
    device = grad_local.device
    grad_v_all = [torch.zeros(g, n_local, dv, dtype=dtype, device=device) for _ in range(layout.cp_size)]
    grad_kn = torch.zeros_like(kn_all[me])
    row_side = [torch.zeros_like(kn_all[me]) for _ in range(layout.cp_size)]  # dKn owed to other ranks
    mine = units.mine()

    def update(i: int, t: int) -> None:  # rows: unit t (later), columns: my unit i
        src = units.owner(t)
        for (d, a, b), (_, r0, r1) in zip(units.pieces[i], units.pieces[t]):
            if r1 > r0 and b > a:
                solver.backward_earlier(kn_all[src][:, r0:r1], grad_v_all[src][:, r0:r1], kn_all[me][:, a:b],
                                        vp_all[me][:, a:b], acc[:, a:b], grad_kn[:, a:b], row_side[src][:, r0:r1])

    def solve(t: int) -> None:
        for _, a, b in units.pieces[t]:
            if b > a:
                gv, gk = solver.solve_backward(kn_all[me][:, a:b], vp_all[me][:, a:b], acc[:, a:b], [(0, b - a)])
                grad_v_all[me][:, a:b] = gv
                grad_kn[:, a:b] += gk

    def post(t: int):
        src = units.owner(t)
        buf = units.pack(grad_v_all[me], t) if src == me else torch.empty(g, units.size(t), dv, dtype=dtype, device=device)
        return buf, broadcast_async(buf, src, group)

    last = units.count - 1
    if units.owner(last) == me:
        solve(last)
    pending = post(last)
    for t in reversed(range(units.count)):
        buf, handle = pending
        handle.wait()
        if units.owner(t) != me:
            units.unpack(buf, grad_v_all[units.owner(t)], t)
        prv = t - 1
        if prv >= 0:
            if units.owner(prv) == me:
                update(prv, t)
                solve(prv)
            pending = post(prv)
        for i in mine:
            if i < prv:
                update(i, t)
    grad_kn += reduce_scatter(row_side, group)
    return grad_v_all[me], grad_kn


def _query_pieces(layout: ZigzagLayout):
    """(doc, chunk, start, end) of each local query piece."""
    for d in range(len(layout.doc_lengths)):
        for chunk in layout.my_chunks():
            _, start, end = layout.piece(d, chunk)
            yield d, chunk, start, end


def _keys_before(tensors_by_rank, layout: ZigzagLayout, doc: int, chunk: int):
    """Chunks 0..chunk-1 of a document, in natural order, from the gathered per-rank tensors [B, H, T, X]."""
    parts = []
    for k in range(chunk):
        owner, start, end = layout.piece(doc, k)
        parts.append(tensors_by_rank[owner][:, :, start:end])
    return torch.cat(parts, dim=2) if parts else None


def _fold(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, Hkv, group * L, D]: a non-causal block needs no per-query-head keys."""
    b, hq, n, d = q.shape
    return q.reshape(b, hkv, (hq // hkv) * n, d)


def _unfold(x: torch.Tensor, hq: int) -> torch.Tensor:
    b, hkv, gn = x.shape[:3]
    return x.reshape(b, hq, gn * hkv // hq, *x.shape[3:])


class P2PAttention(torch.autograd.Function):
    """Inputs in the zigzag layout: q [B, T, Hq, D], k [B, T, Hkv, D], kn (normalised k, compute dtype,
    or None for softmax), v [B, T, Hkv, Dv].  Output o [B, T, Hq, Dv]."""

    @staticmethod
    def forward(ctx, q, k, kn, v, layout, group, scale, sub_chunks, solver):
        b, n, hq, _ = q.shape
        hkv = k.shape[2]
        units = _Units(layout, sub_chunks)
        grouped = lambda x: x.transpose(1, 2).reshape(b * hkv, n, x.shape[-1])  # noqa: E731
        lucid = kn is not None
        if lucid:
            kn_all = all_gather(grouped(kn), group)
            vp_all = _pipeline_forward(kn_all, grouped(v), units, group, solver)
            values = [x.reshape(b, hkv, n, -1).to(v.dtype) for x in vp_all]
        else:
            values = [x.transpose(1, 2) for x in all_gather(v, group)]
        keys = [x.transpose(1, 2) for x in all_gather(k, group)]
        me = layout.cp_rank
        qh = q.transpose(1, 2)
        out = torch.empty(b, hq, n, v.shape[-1], dtype=v.dtype, device=q.device)
        lse = torch.empty(b, hq, n, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                          device=q.device)
        for d, chunk, start, end in _query_pieces(layout):
            qp = qh[:, :, start:end]
            parts = []
            prefix_k = _keys_before(keys, layout, d, chunk)
            if prefix_k is not None:
                o, l, _ = attention_with_lse(_fold(qp, hkv), prefix_k, _keys_before(values, layout, d, chunk),
                                             causal=False, scale=scale)
                parts.append((_unfold(o, hq), _unfold(l, hq)))
            group_size = hq // hkv
            o, l, _ = attention_with_lse(qp, keys[me][:, :, start:end].repeat_interleave(group_size, 1),
                                         values[me][:, :, start:end].repeat_interleave(group_size, 1),
                                         causal=True, scale=scale)
            parts.append((o, l))
            merged, merged_lse = merge(parts)
            out[:, :, start:end] = merged.to(out.dtype)
            lse[:, :, start:end] = merged_lse
        ctx.save_for_backward(q, k, v, out, lse, *( [grouped(kn), vp_all[me]] if lucid else []))
        ctx.layout, ctx.group, ctx.scale, ctx.units, ctx.lucid, ctx.solver = (
            layout, group, scale, units, lucid, solver)
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *lucid_saved = ctx.saved_tensors
        layout, group, scale, units = ctx.layout, ctx.group, ctx.scale, ctx.units
        b, n, hq, _ = q.shape
        hkv = k.shape[2]
        group_size = hq // hkv
        me = layout.cp_rank
        keys = [x.transpose(1, 2) for x in all_gather(k, group)]
        if ctx.lucid:
            kn_local, vp_local = lucid_saved
            kn_all = all_gather(kn_local, group)
            vp_all = all_gather(vp_local, group)
            values = [x.reshape(b, hkv, n, -1).to(v.dtype) for x in vp_all]
        else:
            values = [x.transpose(1, 2) for x in all_gather(v, group)]
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        zeros = lambda *shape: torch.zeros(*shape, dtype=acc_dtype, device=q.device)  # noqa: E731
        grad_q = zeros(b, hq, n, q.shape[-1])
        grad_keys = [zeros(b, hkv, n, k.shape[-1]) for _ in range(layout.cp_size)]
        grad_values = [zeros(b, hkv, n, v.shape[-1]) for _ in range(layout.cp_size)]
        qh, go = q.transpose(1, 2), grad_out.transpose(1, 2)
        for d, chunk, start, end in _query_pieces(layout):
            qp, gp, op, lp = qh[:, :, start:end], go[:, :, start:end], out[:, :, start:end], lse[:, :, start:end]
            prefix_k = _keys_before(keys, layout, d, chunk)
            if prefix_k is not None:
                dq, dk, dv = attention_backward(
                    _fold(gp, hkv), _fold(qp, hkv), prefix_k, _keys_before(values, layout, d, chunk),
                    _fold(op, hkv), _fold(lp[..., None], hkv)[..., 0], None, causal=False, scale=scale)
                grad_q[:, :, start:end] += _unfold(dq, hq)
                offset = 0
                for k_chunk in range(chunk):
                    owner, s0, s1 = layout.piece(d, k_chunk)
                    grad_keys[owner][:, :, s0:s1] += dk[:, :, offset : offset + s1 - s0]
                    grad_values[owner][:, :, s0:s1] += dv[:, :, offset : offset + s1 - s0]
                    offset += s1 - s0
            dq, dk, dv = attention_backward(
                gp, qp, keys[me][:, :, start:end].repeat_interleave(group_size, 1),
                values[me][:, :, start:end].repeat_interleave(group_size, 1), op, lp, None, causal=True,
                scale=scale)
            grad_q[:, :, start:end] += dq
            grad_keys[me][:, :, start:end] += dk.reshape(b, hkv, group_size, end - start, -1).sum(2)
            grad_values[me][:, :, start:end] += dv.reshape(b, hkv, group_size, end - start, -1).sum(2)
        grad_k = reduce_scatter(grad_keys, group)
        grad_vp = reduce_scatter(grad_values, group)  # dLoss/dV' (or dV for softmax), [B, Hkv, T, Dv]
        grad_kn = None
        if ctx.lucid:
            gv, gkn = _pipeline_backward(kn_all, vp_all, grad_vp.reshape(b * hkv, n, -1), units, group,
                                         ctx.solver)
            grad_vp = gv.reshape(b, hkv, n, -1)
            grad_kn = gkn.reshape(b, hkv, n, -1).transpose(1, 2)
        return (grad_q.transpose(1, 2).to(q.dtype), grad_k.transpose(1, 2).to(k.dtype), grad_kn,
                grad_vp.transpose(1, 2).to(v.dtype), None, None, None, None, None)


def p2p_attention(q, k, v, layout: ZigzagLayout, group, *, lucid: bool, eps: float, scale: float,
                  sub_chunks: int = 1, backend: str = "auto", block_cols: int = DEFAULT_BLOCK_COLS) -> torch.Tensor:
    """Context-parallel LUCID (or softmax) attention with the sequence kept sharded.

    ``backend`` picks the solver (``auto``: the Triton kernels on CUDA, else blockwise PyTorch)."""
    kn = rms_normalize(k.to(compute_dtype(k.dtype)), eps) if lucid else None
    resolved = resolve_backend(backend, k.device, max(k.shape[-1], v.shape[-1]), v.dtype)
    solver = make_solver("blockwise" if resolved == "reference" else resolved, v.dtype, block_cols=block_cols)
    return P2PAttention.apply(q, k, kn, v, layout, group, scale, sub_chunks, solver)
