"""The sequential part of LUCID: ``V' = L^{-1} V`` (forward) and ``dV = L^{-T} G`` (backward), one program per
(row block, head), all launched at once.

Each program takes a ticket from an atomic counter, so blocks are claimed in causal order (forward) or
reverse causal order (backward) whatever order the hardware starts programs in; a program only ever waits
for blocks with lower tickets, so it cannot deadlock.  Before any wait it inverts its own diagonal block
(a fully parallel pre-pass, ``tiles.unit_lower_inverse``).  It then consumes the other blocks of its document
*in the order they are published*: whole groups of ``GROUP`` blocks behind one flag (the last of the group:
publication is in order, and acquire/release is transitive, so every earlier block of the group is visible
too), in a loop with no waits in it that Triton can software-pipeline; the last few blocks one flag each.  The
diagonal is applied with one product, the block stored and its flag released.

The sequential chain per head is one block-pair product plus one diagonal product per block; everything else
(almost all FLOPs) overlaps.  In the backward only ``dV`` is sequential; the key gradient needs nothing but
final ``dV`` and ``V'``, so it is a separate kernel with no waits at all.  The diagonal inverses come from a fully parallel pre-pass
(``diagonal_inverse_kernel``), recomputed for the backward rather than kept.  docs/kernels.md has the cost model.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import block_entry, kernel_tile, load_tile, publish, store_tile, unit_lower_inverse, wait_published


@triton.jit
def diagonal_inverse_kernel(
    KN, INV, TABLE, stride_kg, stride_kn, num_blocks, G, D, scale_log2, offset_log2,
    BM: tl.constexpr, BD: tl.constexpr, LOG2_BM: tl.constexpr, PRECISION: tl.constexpr,
    DIAG_PRECISION: tl.constexpr,
):
    """T_i = (I + A_ii)^{-1} of every diagonal block, all at once (nothing sequential), fp32 [BM, BM] each.

    A separate pass, so that the solve kernels do not keep T live in registers across their main loop."""
    pid = tl.program_id(0)
    blk = pid // G
    g = pid % G
    row0, rows, _, _ = block_entry(TABLE, blk)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    valid = offs_m < rows
    kn_i = load_tile(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    lower = (offs_m[:, None] > offs_m[None, :]) & valid[:, None] & valid[None, :]
    strict = tl.where(lower, kernel_tile(kn_i, kn_i, scale_log2, offset_log2, PRECISION), 0.0)
    inverse = unit_lower_inverse(strict, offs_m, LOG2_BM, DIAG_PRECISION)
    tl.store(INV + ((g * num_blocks + blk) * BM + offs_m[:, None]) * BM + offs_m[None, :], inverse)


@triton.jit
def _load_inverse(INV, g, blk, num_blocks, offs_m, BM: tl.constexpr):
    return tl.load(INV + ((g * num_blocks + blk) * BM + offs_m[:, None]) * BM + offs_m[None, :])


@triton.jit
def _subtract_earlier_block(acc, kn_i, j0, KN, VP, g, stride_kg, stride_kn, stride_pg, stride_pn,
                            offs_m, offs_d, offs_v, D, DV, scale_log2, offset_log2, PRECISION: tl.constexpr):
    """acc_i -= L[i, j] V'_j for an earlier, full, published block j."""
    full = offs_m >= 0
    kn_j = load_tile(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, full, D, ".cg")
    vp_j = load_tile(VP, g, stride_pg, stride_pn, j0, offs_m, offs_v, full, DV, ".cg")
    w = kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION)
    return acc - tl.dot(w.to(vp_j.dtype), vp_j, input_precision=PRECISION)


@triton.jit
def forward_kernel(
    KN, V, VP, INV, FLAGS, COUNTER, TABLE,
    stride_kg, stride_kn, stride_vg, stride_vn, stride_pg, stride_pn,
    num_blocks, G, D, DV, scale_log2, offset_log2,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, DIAG_PRECISION: tl.constexpr,
):
    """V'_i = T_i (V_i - sum_{j<i} L_ij V'_j) with T_i = (I + A_ii)^{-1} from ``diagonal_inverse_kernel``;
    V may be any float dtype (read as fp32)."""
    ticket = tl.atomic_add(COUNTER, 1)
    blk = ticket // G
    g = ticket % G
    row0, rows, first, _ = block_entry(TABLE, blk)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    kn_i = load_tile(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    acc = load_tile(V, g, stride_vg, stride_vn, row0, offs_m, offs_v, valid, DV, "").to(tl.float32)

    flags = FLAGS + g * num_blocks
    j = first
    while j + GROUP < blk:  # whole groups, leaving at least one block for the tail
        wait_published(flags + j + GROUP - 1)
        for jj in range(j, j + GROUP):
            acc = _subtract_earlier_block(acc, kn_i, tl.load(TABLE + jj * 4), KN, VP, g, stride_kg, stride_kn,
                                          stride_pg, stride_pn, offs_m, offs_d, offs_v, D, DV, scale_log2,
                                          offset_log2, PRECISION)
        j += GROUP
    for jj in range(j, blk):  # the tail, each block as soon as it is published
        wait_published(flags + jj)
        acc = _subtract_earlier_block(acc, kn_i, tl.load(TABLE + jj * 4), KN, VP, g, stride_kg, stride_kn,
                                      stride_pg, stride_pn, offs_m, offs_d, offs_v, D, DV, scale_log2,
                                      offset_log2, PRECISION)

    vp_i = tl.dot(_load_inverse(INV, g, blk, num_blocks, offs_m, BM), acc, input_precision=DIAG_PRECISION)
    store_tile(VP, g, stride_pg, stride_pn, row0, offs_m, offs_v, valid, DV, vp_i)
    publish(flags + blk)


@triton.jit
def _subtract_later_block(acc, kn_i, valid, j, KN, DV_OUT, TABLE, g, stride_kg, stride_kn, stride_dg, stride_dn,
                          offs_m, offs_d, offs_v, D, DV, scale_log2, offset_log2, PRECISION: tl.constexpr):
    """acc_i -= L[j, i]^T dV_j for a later, published block j (the last block of a document may be short)."""
    j0 = tl.load(TABLE + j * 4)
    jvalid = offs_m < tl.load(TABLE + j * 4 + 1)
    kn_j = load_tile(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, jvalid, D, ".cg")
    dv_j = load_tile(DV_OUT, g, stride_dg, stride_dn, j0, offs_m, offs_v, jvalid, DV, ".cg")
    w_t = kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION)  # L[j, i]^T: rows i, columns j
    w_t = tl.where(valid[:, None] & jvalid[None, :], w_t, 0.0)
    return acc - tl.dot(w_t.to(dv_j.dtype), dv_j, input_precision=PRECISION)


@triton.jit
def backward_solve_kernel(
    KN, GRAD, DV_OUT, INV, FLAGS, COUNTER, TABLE,
    stride_kg, stride_kn, stride_gg, stride_gn, stride_dg, stride_dn,
    num_blocks, G, D, DV, scale_log2, offset_log2,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, DIAG_PRECISION: tl.constexpr,
):
    """dV_i = T_i^T (G_i - sum_{j>i} L_ji^T dV_j), last block first.  Only this is sequential in the backward;
    the key gradient is a parallel kernel afterwards."""
    ticket = tl.atomic_add(COUNTER, 1)
    blk = num_blocks - 1 - ticket // G
    g = ticket % G
    row0, rows, _, last = block_entry(TABLE, blk)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    kn_i = load_tile(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    acc = load_tile(GRAD, g, stride_gg, stride_gn, row0, offs_m, offs_v, valid, DV, "").to(tl.float32)

    # Later blocks in the order they are published: last, last - 1, ..., blk + 1.
    flags = FLAGS + g * num_blocks
    j = last
    while j - GROUP > blk:
        wait_published(flags + j - GROUP + 1)
        for step in range(0, GROUP):
            acc = _subtract_later_block(acc, kn_i, valid, j - step, KN, DV_OUT, TABLE, g, stride_kg, stride_kn,
                                        stride_dg, stride_dn, offs_m, offs_d, offs_v, D, DV, scale_log2,
                                        offset_log2, PRECISION)
        j -= GROUP
    for step in range(0, j - blk):
        wait_published(flags + j - step)
        acc = _subtract_later_block(acc, kn_i, valid, j - step, KN, DV_OUT, TABLE, g, stride_kg, stride_kn,
                                    stride_dg, stride_dn, offs_m, offs_d, offs_v, D, DV, scale_log2, offset_log2,
                                    PRECISION)

    inverse = _load_inverse(INV, g, blk, num_blocks, offs_m, BM)
    dv_i = tl.dot(tl.trans(inverse), acc, input_precision=DIAG_PRECISION)
    store_tile(DV_OUT, g, stride_dg, stride_dn, row0, offs_m, offs_v, valid, DV, dv_i)
    publish(flags + blk)


@triton.jit
def backward_keys_kernel(
    KN, VP, DV, DKN, TABLE,
    stride_kg, stride_kn, stride_pg, stride_pn, stride_dg, stride_dn, stride_og, stride_on,
    G, D, DV_DIM, scale, scale_log2, offset_log2,
    BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    """dKn_i = s * sum_j (dS_ij + dS_ji) Kn_j over the block's document, with dS = -(dV V'^T) * L strictly
    lower; every input is final, so all blocks run at once with no waits."""
    pid = tl.program_id(0)
    blk = pid // G
    g = pid % G
    row0, rows, first, last = block_entry(TABLE, blk)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = offs_m < rows
    full = offs_m >= 0
    kn_i = load_tile(KN, g, stride_kg, stride_kn, row0, offs_m, offs_d, valid, D, "")
    vp_i = load_tile(VP, g, stride_pg, stride_pn, row0, offs_m, offs_v, valid, DV_DIM, "")
    dv_i = load_tile(DV, g, stride_dg, stride_dn, row0, offs_m, offs_v, valid, DV_DIM, "")
    dkn = tl.zeros((BM, BD), dtype=tl.float32)
    for j in range(first, blk):  # row side: earlier blocks of the document (full)
        j0 = tl.load(TABLE + j * 4)
        kn_j = load_tile(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, full, D, "")
        vp_j = load_tile(VP, g, stride_pg, stride_pn, j0, offs_m, offs_v, full, DV_DIM, "")
        w = kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION)
        neg_ds = tl.dot(dv_i, tl.trans(vp_j), input_precision=PRECISION) * w  # -dS[i, j]
        dkn -= tl.dot(neg_ds.to(kn_j.dtype), kn_j, input_precision=PRECISION)
    for j in range(blk + 1, last + 1):  # column side: later blocks (the document's last may be short)
        j0 = tl.load(TABLE + j * 4)
        jvalid = offs_m < tl.load(TABLE + j * 4 + 1)
        kn_j = load_tile(KN, g, stride_kg, stride_kn, j0, offs_m, offs_d, jvalid, D, "")
        dv_j = load_tile(DV, g, stride_dg, stride_dn, j0, offs_m, offs_v, jvalid, DV_DIM, "")
        w_t = tl.where(jvalid[None, :], kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION), 0.0)
        neg_ds_t = tl.dot(vp_i, tl.trans(dv_j), input_precision=PRECISION) * w_t  # -dS[j, i]^T
        dkn -= tl.dot(neg_ds_t.to(kn_j.dtype), kn_j, input_precision=PRECISION)
    lower = (offs_m[:, None] > offs_m[None, :]) & valid[:, None] & valid[None, :]
    w = kernel_tile(kn_i, kn_i, scale_log2, offset_log2, PRECISION)
    neg_ds = tl.where(lower, tl.dot(dv_i, tl.trans(vp_i), input_precision=PRECISION) * w, 0.0).to(kn_i.dtype)
    dkn -= tl.dot(neg_ds, kn_i, input_precision=PRECISION) + tl.dot(tl.trans(neg_ds), kn_i, input_precision=PRECISION)
    store_tile(DKN, g, stride_og, stride_on, row0, offs_m, offs_d, valid, D, dkn * scale)
