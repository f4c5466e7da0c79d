"""Triton kernels for the LUCID preconditioner ``V' = L^{-1} V`` and its backward.

Tensors are grouped ``[G, N, D]`` (``G = batch x KV heads``), rows split into blocks of ``BM`` rows that never
cross a packed document.  ``L`` is never stored: every block ``exp(s kn_i.kn_j - 1/s)`` is computed on chip.

Parallelism (docs/kernels.md): one program per (row block, head), all launched at once.  Each program takes a
*ticket* from an atomic counter, so blocks are claimed in causal order whatever order the hardware starts
programs in; a program subtracts the contributions of the earlier blocks of its document as soon as each is
published (spin-waiting on a per-block flag with acquire semantics), then solves its diagonal block on chip
and publishes its own rows (release).  Only the diagonal solves form the sequential chain; the off-diagonal
work of all blocks runs concurrently.  The backward is the same pipeline in reverse for ``dV = L^{-T} G``
(which also produces the column-side ``dKn`` terms), followed by a fully parallel kernel for the row-side
``dKn`` terms and the diagonal blocks.

Pointer arithmetic only (no block pointers: removed in Triton 3.9); works with Triton 3.6+ and, for tests,
``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _wait(flag_ptr):
    while tl.atomic_add(flag_ptr, 0, sem="acquire") == 0:
        pass


@triton.jit
def _publish(flag_ptr):
    tl.debug_barrier()  # every thread's stores of this block are done ...
    tl.atomic_xchg(flag_ptr, 1, sem="release")  # ... before the flag says so


@triton.jit
def _block_entry(TABLE, blk):
    """(first row, rows, first block of its document, last block of its document) of block ``blk``."""
    entry = TABLE + blk * 4
    return tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)


@triton.jit
def _load_block(PTR, g, stride_g, stride_n, row0, offs_m, offs_x, rows_ok, width, CACHE: tl.constexpr):
    """A [BM, BX] tile of rows ``row0 + offs_m`` of head ``g``; rows not ok and columns >= width read 0."""
    ptrs = PTR + g * stride_g + (row0 + offs_m)[:, None] * stride_n + offs_x[None, :]
    return tl.load(ptrs, mask=rows_ok[:, None] & (offs_x[None, :] < width), other=0.0, cache_modifier=CACHE)


@triton.jit
def _store_block(PTR, g, stride_g, stride_n, row0, offs_m, offs_x, rows_ok, width, value):
    ptrs = PTR + g * stride_g + (row0 + offs_m)[:, None] * stride_n + offs_x[None, :]
    tl.store(ptrs, value, mask=rows_ok[:, None] & (offs_x[None, :] < width))


@triton.jit
def _kernel_block(rows_scaled, cols, inv_scale, PRECISION: tl.constexpr):
    """exp(s kn_r . kn_c - 1/s) for rows already multiplied by s: [BM, BM]."""
    return tl.exp(tl.dot(rows_scaled, tl.trans(cols), input_precision=PRECISION) - inv_scale)


@triton.jit
def _forward_kernel(
    KN, V, VP, FLAGS, COUNTER, TABLE,
    stride_kg, stride_kn, stride_vg, stride_vn, stride_pg, stride_pn,
    num_blocks, G, D, DV, scale, inv_scale,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    ticket = tl.atomic_add(COUNTER, 1)  # claim blocks in causal order
    blk = ticket // G
    g = ticket % G
    row0, rows, first, _ = _block_entry(TABLE, blk)

    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    full = offs_m < BM
    kn_i = _load_block(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    acc = _load_block(V, g, stride_vg, stride_vn, row0, offs_m, offs_v, valid, DV, "").to(tl.float32)
    rows_scaled = kn_i * scale

    # Earlier blocks of the same document (all full), as soon as each is published.
    for j in range(first, blk):
        _wait(FLAGS + g * num_blocks + j)
        j0 = tl.load(TABLE + j * 4)
        kn_j = _load_block(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, full, D, ".cg")
        vp_j = _load_block(VP, g, stride_pg, stride_pn, j0, offs_m, offs_v, full, DV, ".cg")
        w = _kernel_block(rows_scaled, kn_j, inv_scale, PRECISION)
        acc -= tl.dot(w, vp_j, input_precision=PRECISION)

    # Diagonal block: forward substitution on chip, column by column. L_ii = 1 is implicit.
    w = _kernel_block(rows_scaled, kn_i, inv_scale, PRECISION)
    lower = (offs_m[:, None] > offs_m[None, :]) & valid[:, None] & valid[None, :]
    w = tl.where(lower, w, 0.0)
    for r in tl.static_range(BM):
        x_r = tl.sum(tl.where(offs_m[:, None] == r, acc, 0.0), axis=0)  # row r: final now
        col_r = tl.sum(tl.where(offs_m[None, :] == r, w, 0.0), axis=1)  # L[:, r] below the diagonal
        acc -= col_r[:, None] * x_r[None, :]
    _store_block(VP, g, stride_pg, stride_pn, row0, offs_m, offs_v, valid, DV, acc)
    _publish(FLAGS + g * num_blocks + blk)


@triton.jit
def _backward_solve_kernel(
    KN, VP, GRAD, DV_OUT, DKN_COL, FLAGS, COUNTER, TABLE,
    stride_kg, stride_kn, stride_pg, stride_pn, stride_gg, stride_gn, stride_dg, stride_dn, stride_cg, stride_cn,
    num_blocks, G, D, DV, scale, inv_scale,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV = L^{-T} G from the last block to the first, plus dKn_i's terms from later rows j > i."""
    ticket = tl.atomic_add(COUNTER, 1)
    blk = num_blocks - 1 - ticket // G  # reverse causal order
    g = ticket % G
    row0, rows, _, last = _block_entry(TABLE, blk)

    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    kn_i = _load_block(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    vp_i = _load_block(VP, g, stride_pg, stride_pn, row0, offs_m, offs_v, valid, DV, "")
    acc = _load_block(GRAD, g, stride_gg, stride_gn, row0, offs_m, offs_v, valid, DV, "").to(tl.float32)
    dkn = tl.zeros((BM, BD), dtype=tl.float32)

    for j in range(blk + 1, last + 1):
        _wait(FLAGS + g * num_blocks + j)
        j0 = tl.load(TABLE + j * 4)
        jrows = tl.load(TABLE + j * 4 + 1)
        jvalid = offs_m < jrows
        kn_j = _load_block(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, jvalid, D, "")
        dv_j = _load_block(DV_OUT, g, stride_dg, stride_dn, j0, offs_m, offs_v, jvalid, DV, ".cg")
        w_ji = _kernel_block(kn_j * scale, kn_i, inv_scale, PRECISION)  # L[j, i]: rows j, columns i
        w_ji = tl.where(jvalid[:, None] & valid[None, :], w_ji, 0.0)
        acc -= tl.dot(tl.trans(w_ji), dv_j, input_precision=PRECISION)
        neg_ds = tl.dot(dv_j, tl.trans(vp_i), input_precision=PRECISION) * w_ji  # -dS[j, i]
        dkn -= scale * tl.dot(tl.trans(neg_ds), kn_j, input_precision=PRECISION)

    # Diagonal block: backward substitution with L_ii^T, row r from the last to the first.
    w = _kernel_block(kn_i * scale, kn_i, inv_scale, PRECISION)
    lower = (offs_m[:, None] > offs_m[None, :]) & valid[:, None] & valid[None, :]
    w = tl.where(lower, w, 0.0)
    for step in tl.static_range(BM):
        r = BM - 1 - step
        x_r = tl.sum(tl.where(offs_m[:, None] == r, acc, 0.0), axis=0)
        row_r = tl.sum(tl.where(offs_m[:, None] == r, w, 0.0), axis=0)  # L[r, c] for c < r
        acc -= row_r[:, None] * x_r[None, :]
    _store_block(DV_OUT, g, stride_dg, stride_dn, row0, offs_m, offs_v, valid, DV, acc)
    _store_block(DKN_COL, g, stride_cg, stride_cn, row0, offs_m, offs_d, valid, D, dkn)
    _publish(FLAGS + g * num_blocks + blk)


@triton.jit
def _backward_rows_kernel(
    KN, VP, DV, DKN_COL, DKN, TABLE,
    stride_kg, stride_kn, stride_pg, stride_pn, stride_dg, stride_dn, stride_cg, stride_cn, stride_og, stride_on,
    G, D, DV_DIM, scale, inv_scale,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dKn_i = (column terms from the solve kernel) + row terms from earlier j < i + the diagonal block."""
    pid = tl.program_id(0)
    blk = pid // G
    g = pid % G
    row0, rows, first, _ = _block_entry(TABLE, blk)

    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    full = offs_m < BM
    kn_i = _load_block(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    vp_i = _load_block(VP, g, stride_pg, stride_pn, row0, offs_m, offs_v, valid, DV_DIM, "")
    dv_i = _load_block(DV, g, stride_dg, stride_dn, row0, offs_m, offs_v, valid, DV_DIM, "")
    dkn = _load_block(DKN_COL, g, stride_cg, stride_cn, row0, offs_m, offs_d, valid, D, "")
    rows_scaled = kn_i * scale
    for j in range(first, blk):  # earlier, full blocks of the document
        j0 = tl.load(TABLE + j * 4)
        kn_j = _load_block(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, full, D, "")
        vp_j = _load_block(VP, g, stride_pg, stride_pn, j0, offs_m, offs_v, full, DV_DIM, "")
        w = _kernel_block(rows_scaled, kn_j, inv_scale, PRECISION)
        neg_ds = tl.dot(dv_i, tl.trans(vp_j), input_precision=PRECISION) * w  # -dS[i, j]
        dkn -= scale * tl.dot(neg_ds, kn_j, input_precision=PRECISION)
    w = _kernel_block(rows_scaled, kn_i, inv_scale, PRECISION)
    lower = (offs_m[:, None] > offs_m[None, :]) & valid[:, None] & valid[None, :]
    neg_ds = tl.where(lower, tl.dot(dv_i, tl.trans(vp_i), input_precision=PRECISION) * w, 0.0)
    dkn -= scale * (tl.dot(neg_ds, kn_i, input_precision=PRECISION)
                    + tl.dot(tl.trans(neg_ds), kn_i, input_precision=PRECISION))
    _store_block(DKN, g, stride_og, stride_on, row0, offs_m, offs_d, valid, D, dkn)


# ---- host side ------------------------------------------------------------------------------------------


def block_table(segments: list[tuple[int, int]], block_m: int, device) -> torch.Tensor:
    """[num_blocks, 4] int32: (first row, rows, first block of its document, last block of its document)."""
    entries = []
    for start, end in segments:
        first = len(entries)
        count = -(-(end - start) // block_m)
        for b in range(count):
            row0 = start + b * block_m
            entries.append([row0, min(block_m, end - row0), first, first + count - 1])
    return torch.tensor(entries, dtype=torch.int32, device=device).reshape(-1, 4)


def _padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    """Exact fp32 products by default (the exponent s kn.kn is sensitive); LUCID_TRITON_PRECISION=tf32 trades
    accuracy for tensor-core speed on GPU (see docs/kernels.md)."""
    choice = os.environ.get("LUCID_TRITON_PRECISION", "ieee")
    if choice not in ("ieee", "tf32"):
        raise ValueError(f"LUCID_TRITON_PRECISION={choice!r}; allowed: 'ieee', 'tf32'")
    return choice


def forward(kn: torch.Tensor, v: torch.Tensor, segments, block_m: int) -> torch.Tensor:
    """V' [G, N, Dv] float32 from kn [G, N, D] float32 and v [G, N, Dv]."""
    g, n, d = kn.shape
    dv = v.shape[-1]
    table = block_table(segments, block_m, kn.device)
    blocks = table.shape[0]
    vp = torch.empty(g, n, dv, dtype=torch.float32, device=kn.device)
    flags = torch.zeros(g * blocks, dtype=torch.int32, device=kn.device)
    counter = torch.zeros(1, dtype=torch.int32, device=kn.device)
    scale = d**-0.5
    _forward_kernel[(blocks * g,)](
        kn, v, vp, flags, counter, table,
        kn.stride(0), kn.stride(1), v.stride(0), v.stride(1), vp.stride(0), vp.stride(1),
        blocks, g, d, dv, scale, 1.0 / scale,
        BM=block_m, BD=_padded(d), BDV=_padded(dv), PRECISION=_precision(v.dtype),
    )
    return vp


def backward(kn: torch.Tensor, vp: torch.Tensor, grad_vp: torch.Tensor, segments, block_m: int):
    """(dV, dKn) float32 for V' = L^{-1} V."""
    g, n, d = kn.shape
    dv = vp.shape[-1]
    table = block_table(segments, block_m, kn.device)
    blocks = table.shape[0]
    grad_v = torch.empty(g, n, dv, dtype=torch.float32, device=kn.device)
    dkn_col = torch.empty(g, n, d, dtype=torch.float32, device=kn.device)
    grad_kn = torch.empty(g, n, d, dtype=torch.float32, device=kn.device)
    flags = torch.zeros(g * blocks, dtype=torch.int32, device=kn.device)
    counter = torch.zeros(1, dtype=torch.int32, device=kn.device)
    scale = d**-0.5
    meta = dict(BM=block_m, BD=_padded(d), BDV=_padded(dv), PRECISION=_precision(grad_vp.dtype))
    _backward_solve_kernel[(blocks * g,)](
        kn, vp, grad_vp, grad_v, dkn_col, flags, counter, table,
        kn.stride(0), kn.stride(1), vp.stride(0), vp.stride(1), grad_vp.stride(0), grad_vp.stride(1),
        grad_v.stride(0), grad_v.stride(1), dkn_col.stride(0), dkn_col.stride(1),
        blocks, g, d, dv, scale, 1.0 / scale, **meta,
    )
    _backward_rows_kernel[(blocks * g,)](
        kn, vp, grad_v, dkn_col, grad_kn, table,
        kn.stride(0), kn.stride(1), vp.stride(0), vp.stride(1), grad_v.stride(0), grad_v.stride(1),
        dkn_col.stride(0), dkn_col.stride(1), grad_kn.stride(0), grad_kn.stride(1),
        g, d, dv, scale, 1.0 / scale, **meta,
    )
    return grad_v, grad_kn


class TritonPrecondition(torch.autograd.Function):
    """V' = L^{-1} V with Triton kernels; inputs kn [G, N, D] (float32), v [G, N, Dv] (any float dtype)."""

    @staticmethod
    def forward(ctx, kn, v, segments, block_m):
        kn, v = kn.contiguous(), v.contiguous()
        vp = forward(kn, v, segments, block_m)
        ctx.save_for_backward(kn, vp)
        ctx.segments, ctx.block_m, ctx.v_dtype = segments, block_m, v.dtype
        return vp.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_vp):
        kn, vp = ctx.saved_tensors
        grad_v, grad_kn = backward(kn, vp, grad_vp.contiguous(), ctx.segments, ctx.block_m)
        return grad_kn, grad_v.to(ctx.v_dtype), None, None
