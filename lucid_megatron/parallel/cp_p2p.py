"""Sequence-pipelined context parallelism (``cp_comm_type="p2p"``) for LUCID and softmax.

The sequence stays sharded in the zigzag layout and every transfer is point-to-point or a broadcast of one
block; no rank ever holds another rank's whole shard of ``Kn`` or ``V'`` for long, nor the whole sequence.

* The solve.  Every document's ``2 * cp`` chunks (each optionally cut into ``sub_chunks`` pipeline units)
  are solved in causal order: the owner of unit ``t`` finishes ``V'_t = L_tt^{-1} (V_t - sum_{u<t} L_tu
  V'_u)`` and broadcasts ``(Kn_t, V'_t)``; every rank subtracts ``L_jt V'_t`` from the accumulators of its
  own later units and drops the block.  The update of the *next* unit is done first and the next broadcast
  is posted before the remaining updates, so communication overlaps computation.
* The softmax part is ring attention: each rank's ``(K, V')`` shard travels round the CP ring (the next
  shard in flight while the current one is used); the local query chunks attend to the earlier chunks of
  each shard (a non-causal block) and to their own chunk (a causal diagonal), merged by log-sum-exp.
* The backward passes ``(K, V')`` round the ring again, the key/value gradients of each shard travelling
  with it back to its owner, then runs the pipeline in reverse for ``dV = L^{-T} dV'`` (broadcasting
  ``(Kn_t, dV_t)``) and reduce-scatters the row side of ``dKn``.

docs/context-parallel.md has the communication volume and the critical path.
"""

from __future__ import annotations

import torch

from lucid_megatron.ops.attention import resolve_backend
from lucid_megatron.ops.blockwise import DEFAULT_BLOCK_COLS, compute_dtype, rms_normalize
from lucid_megatron.ops.flash_blocks import attention_backward, attention_with_lse, merge
from lucid_megatron.ops.solver import Solver, make_solver

from .context import RingPass, ZigzagLayout, broadcast_async, reduce_scatter

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

    def split(self, buffer: torch.Tensor, t: int) -> list[torch.Tensor]:
        """The per-document pieces of a packed (``pack``) buffer of unit ``t``."""
        return list(buffer.split([b - a for _, a, b in self.pieces[t]], dim=1))

    def size(self, t: int) -> int:
        return sum(b - a for _, a, b in self.pieces[t])


def _broadcast_unit(units: _Units, t: int, mine: list[torch.Tensor], group):
    """Post the broadcast of unit ``t``'s ``mine`` tensors (packed along the last dim) from its owner;
    returns a function that waits and gives each tensor's per-document pieces."""
    widths = [x.shape[-1] for x in mine]
    if units.owner(t) == units.layout.cp_rank:
        buffer = torch.cat([units.pack(x, t) for x in mine], dim=-1)
    else:
        first = mine[0]
        buffer = torch.empty(first.shape[0], units.size(t), sum(widths), dtype=first.dtype, device=first.device)
    handle = broadcast_async(buffer, units.owner(t), group)

    def received() -> list[list[torch.Tensor]]:
        handle.wait()
        return [units.split(x, t) for x in buffer.split(widths, dim=-1)]

    return received


def _pipeline_forward(kn, v_local, units: _Units, group, solver: Solver) -> torch.Tensor:
    """This rank's V' (local layout, compute dtype) by the broadcast pipeline."""
    me = units.layout.cp_rank
    acc = v_local.to(kn.dtype, copy=True)  # my units' accumulators, in place in the local layout
    vp = torch.empty_like(acc)
    mine = units.mine()

    def update(j: int, kn_t, vp_t) -> None:  # acc_j -= L[j, t] V'_t, document by document
        for (_, a, b), kt, vt in zip(units.pieces[j], kn_t, vp_t):
            if kt.shape[1] and b > a:
                solver.subtract_earlier(acc[:, a:b], kn[:, a:b], kt, vt)

    def solve(t: int) -> None:
        for _, a, b in units.pieces[t]:
            if b > a:
                vp[:, a:b] = solver.solve(kn[:, a:b], acc[:, a:b], [(0, b - a)])

    if units.owner(0) == me:
        solve(0)
    pending = _broadcast_unit(units, 0, [kn, vp], group)
    for t in range(units.count):
        kn_t, vp_t = pending()
        nxt = t + 1
        if nxt < units.count:
            if units.owner(nxt) == me:  # the critical path: finish the next unit first
                update(nxt, kn_t, vp_t)
                solve(nxt)
            pending = _broadcast_unit(units, nxt, [kn, vp], group)
        for j in mine:
            if j > nxt:
                update(j, kn_t, vp_t)
    return vp


def _pipeline_backward(kn, vp, grad_local, units: _Units, group, solver: Solver):
    """dV (local) and dKn (local, all contributions) of V' = L^{-1} V, by the reverse pipeline."""
    layout, me = units.layout, units.layout.cp_rank
    acc = grad_local.to(kn.dtype, copy=True)
    grad_v = torch.zeros_like(acc)
    grad_kn = torch.zeros_like(kn)
    row_side = [torch.zeros_like(kn) for _ in range(layout.cp_size)]  # dKn owed to other ranks
    mine = units.mine()

    def update(i: int, t: int, kn_t, gv_t) -> None:  # rows: unit t (later), columns: my unit i
        rows = row_side[units.owner(t)]
        for (_, a, b), (_, r0, r1), kt, gt in zip(units.pieces[i], units.pieces[t], kn_t, gv_t):
            if r1 > r0 and b > a:
                solver.backward_earlier(kt, gt, kn[:, a:b], vp[:, a:b], acc[:, a:b], grad_kn[:, a:b],
                                        rows[:, r0:r1])

    def solve(t: int) -> None:
        for _, a, b in units.pieces[t]:
            if b > a:
                gv, gk = solver.solve_backward(kn[:, a:b], vp[:, a:b], acc[:, a:b], [(0, b - a)])
                grad_v[:, a:b] = gv
                grad_kn[:, a:b] += gk

    last = units.count - 1
    if units.owner(last) == me:
        solve(last)
    pending = _broadcast_unit(units, last, [kn, grad_v], group)
    for t in reversed(range(units.count)):
        kn_t, gv_t = pending()
        prv = t - 1
        if prv >= 0:
            if units.owner(prv) == me:
                update(prv, t, kn_t, gv_t)
                solve(prv)
            pending = _broadcast_unit(units, prv, [kn, grad_v], group)
        for i in mine:
            if i < prv:
                update(i, t, kn_t, gv_t)
    grad_kn += reduce_scatter(row_side, group)
    return grad_v, grad_kn


def _query_pieces(layout: ZigzagLayout):
    """(doc, chunk, start, end) of each local query piece."""
    for d in range(len(layout.doc_lengths)):
        for chunk in layout.my_chunks():
            _, start, end = layout.piece(d, chunk)
            yield d, chunk, start, end


def _blocks(layout: ZigzagLayout, src: int):
    """What each local query piece attends to in rank ``src``'s shard: (start, end) of the piece, the
    (start, end) ranges in ``src``'s local tensor of the chunks before it (a non-causal block), and whether
    the shard holds the piece itself (the causal diagonal: ``src`` is this rank)."""
    for d, chunk, start, end in _query_pieces(layout):
        earlier = [layout.piece(d, kc)[1:] for kc in layout.my_chunks(src) if kc < chunk]
        yield start, end, earlier, src == layout.cp_rank


def _take(x: torch.Tensor, ranges) -> torch.Tensor:
    return torch.cat([x[:, :, a:b] for a, b in ranges], dim=2)


def _fold(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, L, D] -> [B, Hkv, group * L, D]: a non-causal block needs no per-query-head keys."""
    b, hq, n, d = q.shape
    return q.reshape(b, hkv, (hq // hkv) * n, d)


def _unfold(x: torch.Tensor, hq: int) -> torch.Tensor:
    b, hkv, gn = x.shape[:3]
    return x.reshape(b, hq, gn * hkv // hq, *x.shape[3:])


def _ring_forward(q, keys, values, layout: ZigzagLayout, group, scale: float):
    """Causal attention of the local queries q [B, Hq, T, D] over the whole sequence, the key/value shards
    [B, Hkv, T, X] passed round the ring.  Returns (out, lse), out in float32 (float64 for float64)."""
    b, hq, n, _ = q.shape
    hkv = keys.shape[1]
    size, me = layout.cp_size, layout.cp_rank
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(b, hq, n, values.shape[-1], dtype=acc_dtype, device=q.device)
    lse = torch.full((b, hq, n), float("-inf"), dtype=acc_dtype, device=q.device)
    shard = [keys, values]
    for step in range(size):
        in_flight = RingPass(shard, group) if step + 1 < size else None
        k_s, v_s = shard
        for start, end, earlier, diagonal in _blocks(layout, (me - step) % size):
            qp, parts = q[:, :, start:end], [(out[:, :, start:end], lse[:, :, start:end])]
            if diagonal:  # step 0: every query sees itself, so the running log-sum-exp is finite from here
                group_size = hq // hkv
                o, l, _ = attention_with_lse(qp, k_s[:, :, start:end].repeat_interleave(group_size, 1),
                                             v_s[:, :, start:end].repeat_interleave(group_size, 1),
                                             causal=True, scale=scale)
                parts.append((o, l))
            if earlier:
                o, l, _ = attention_with_lse(_fold(qp, hkv), _take(k_s, earlier), _take(v_s, earlier),
                                             causal=False, scale=scale)
                parts.append((_unfold(o, hq), _unfold(l, hq)))
            if len(parts) > 1:
                out[:, :, start:end], lse[:, :, start:end] = merge(parts)
        if in_flight is not None:
            shard = in_flight.wait()
    return out, lse


def _ring_backward(grad_out, q, keys, values, out, lse, layout: ZigzagLayout, group, scale: float):
    """Gradients of ``_ring_forward`` given its merged out/lse: dq [B, Hq, T, D] and this rank's dK, dV
    [B, Hkv, T, X] (float32, float64 for float64).  A shard's key/value gradients accumulate as it travels
    and go back to its owner on the last hop."""
    b, hq, n, _ = q.shape
    hkv = keys.shape[1]
    group_size = hq // hkv
    size, me = layout.cp_size, layout.cp_rank
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_q = torch.zeros(b, hq, n, q.shape[-1], dtype=acc_dtype, device=q.device)
    shard, grads_in_flight, own = [keys, values], None, None
    for step in range(size):
        in_flight = RingPass(shard, group) if step + 1 < size else None
        k_s, v_s = shard
        grad_k = torch.zeros(k_s.shape, dtype=acc_dtype, device=q.device)
        grad_v = torch.zeros(v_s.shape, dtype=acc_dtype, device=q.device)
        for start, end, earlier, diagonal in _blocks(layout, (me - step) % size):
            qp, gp, op, lp = q[:, :, start:end], grad_out[:, :, start:end], out[:, :, start:end], lse[:, :, start:end]
            if diagonal:
                dq, dk, dv = attention_backward(gp, qp, k_s[:, :, start:end].repeat_interleave(group_size, 1),
                                                v_s[:, :, start:end].repeat_interleave(group_size, 1), op, lp, None,
                                                causal=True, scale=scale)
                grad_q[:, :, start:end] += dq
                grad_k[:, :, start:end] += dk.reshape(b, hkv, group_size, end - start, -1).sum(2)
                grad_v[:, :, start:end] += dv.reshape(b, hkv, group_size, end - start, -1).sum(2)
            if earlier:
                dq, dk, dv = attention_backward(_fold(gp, hkv), _fold(qp, hkv), _take(k_s, earlier),
                                                _take(v_s, earlier), _fold(op, hkv),
                                                _fold(lp[..., None], hkv)[..., 0], None, causal=False, scale=scale)
                grad_q[:, :, start:end] += _unfold(dq, hq)
                offset = 0
                for a, z in earlier:
                    grad_k[:, :, a:z] += dk[:, :, offset : offset + z - a]
                    grad_v[:, :, a:z] += dv[:, :, offset : offset + z - a]
                    offset += z - a
        if step == 0:
            own = [grad_k, grad_v]  # this rank's shard: its gradients so far stay here
        else:
            if grads_in_flight is not None:  # what earlier ranks accumulated for this shard
                got_k, got_v = grads_in_flight.wait()
                grad_k += got_k
                grad_v += got_v
            grads_in_flight = RingPass([grad_k, grad_v], group)
        if in_flight is not None:
            shard = in_flight.wait()
    if grads_in_flight is not None:  # the last hop brings this rank's own shard home
        got_k, got_v = grads_in_flight.wait()
        own[0] += got_k
        own[1] += got_v
    return grad_q, own[0], own[1]


class P2PAttention(torch.autograd.Function):
    """Inputs in the zigzag layout: q [B, T, Hq, D], k [B, T, Hkv, D], kn (normalised k, compute dtype,
    or None for softmax), v [B, T, Hkv, Dv].  Output o [B, T, Hq, Dv]."""

    @staticmethod
    def forward(ctx, q, k, kn, v, layout, group, scale, sub_chunks, solver):
        b, n, _, _ = q.shape
        hkv = k.shape[2]
        units = _Units(layout, sub_chunks)
        lucid = kn is not None
        saved = []
        if lucid:
            kn_grouped = kn.transpose(1, 2).reshape(b * hkv, n, -1)
            vp = _pipeline_forward(kn_grouped, v.transpose(1, 2).reshape(b * hkv, n, -1), units, group, solver)
            saved = [kn_grouped, vp]
            values = vp.reshape(b, hkv, n, -1).to(v.dtype)
        else:
            values = v.transpose(1, 2).contiguous()
        out, lse = _ring_forward(q.transpose(1, 2), k.transpose(1, 2).contiguous(), values, layout, group, scale)
        out = out.to(v.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *saved)
        ctx.layout, ctx.group, ctx.scale, ctx.units, ctx.lucid, ctx.solver = (
            layout, group, scale, units, lucid, solver)
        return out.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *lucid_saved = ctx.saved_tensors
        b, n, _, _ = q.shape
        hkv = k.shape[2]
        if ctx.lucid:
            kn_grouped, vp = lucid_saved
            values = vp.reshape(b, hkv, n, -1).to(v.dtype)
        else:
            values = v.transpose(1, 2).contiguous()
        grad_q, grad_k, grad_values = _ring_backward(
            grad_out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2).contiguous(), values, out, lse,
            ctx.layout, ctx.group, ctx.scale)
        grad_kn = None
        if ctx.lucid:  # grad_values is dLoss/dV'; the reverse pipeline turns it into dV (and dKn)
            gv, gkn = _pipeline_backward(kn_grouped, vp, grad_values.reshape(b * hkv, n, -1), ctx.units,
                                         ctx.group, ctx.solver)
            grad_values = gv.reshape(b, hkv, n, -1)
            grad_kn = gkn.reshape(b, hkv, n, -1).transpose(1, 2)
        return (grad_q.transpose(1, 2).to(q.dtype), grad_k.transpose(1, 2).to(k.dtype), grad_kn,
                grad_values.transpose(1, 2).to(v.dtype), None, None, None, None, None)


def p2p_attention(q, k, v, layout: ZigzagLayout, group, *, lucid: bool, eps: float, scale: float,
                  sub_chunks: int = 1, backend: str = "auto", block_cols: int = DEFAULT_BLOCK_COLS) -> torch.Tensor:
    """Context-parallel LUCID (or softmax) attention with the sequence kept sharded.

    ``backend`` picks the solver (``auto``: the Triton kernels on CUDA, else blockwise PyTorch)."""
    kn = rms_normalize(k.to(compute_dtype(k.dtype)), eps) if lucid else None
    resolved = resolve_backend(backend, k.device, max(k.shape[-1], v.shape[-1]), v.dtype)
    solver = make_solver("blockwise" if resolved == "reference" else resolved, v.dtype, block_cols=block_cols)
    return P2PAttention.apply(q, k, kn, v, layout, group, scale, sub_chunks, solver)
