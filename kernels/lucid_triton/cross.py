"""The parallel part of LUCID between two disjoint row sets, every row after every column (no causal mask):
what context parallelism and the decode cache need on top of the solve.

* ``subtract_kernel``: ``acc_rows -= L[rows, cols] V'_cols`` (forward update from earlier, solved rows);
* ``backward_cols_kernel``: ``acc_cols -= L[rows, cols]^T dV_rows`` and the column-side ``dKn_cols`` terms;
* ``backward_rows_kernel``: the row-side ``dKn_rows`` terms.

One program per (row block, head), a plain loop over the other side's blocks: no waits, pipelined loads.
All outputs are fp32 accumulators updated in place.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import kernel_tile, load_tile, store_tile


@triton.jit
def subtract_kernel(
    ACC, ROWS_KN, COLS_KN, COLS_VP,
    stride_ag, stride_an, stride_rg, stride_rn, stride_kg, stride_kn, stride_pg, stride_pn,
    G, R, C, D, DV, scale_log2, offset_log2,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = (pid // G) * BM
    g = pid % G
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = row0 + offs_m < R
    kn_i = load_tile(ROWS_KN, g, stride_rg, stride_rn, row0, offs_m, offs_d, valid, D, "")
    acc = load_tile(ACC, g, stride_ag, stride_an, row0, offs_m, offs_v, valid, DV, "")
    for c0 in range(0, C, BN):
        cvalid = c0 + offs_n < C
        kn_j = load_tile(COLS_KN, g, stride_kg, stride_kn, c0, offs_n, offs_d, cvalid, D, "")
        vp_j = load_tile(COLS_VP, g, stride_pg, stride_pn, c0, offs_n, offs_v, cvalid, DV, "")
        w = tl.where(cvalid[None, :], kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION), 0.0)
        acc -= tl.dot(w.to(vp_j.dtype), vp_j, input_precision=PRECISION)
    store_tile(ACC, g, stride_ag, stride_an, row0, offs_m, offs_v, valid, DV, acc)


@triton.jit
def backward_cols_kernel(
    ACC, DKN, COLS_KN, COLS_VP, ROWS_KN, ROWS_DV,
    stride_ag, stride_an, stride_og, stride_on, stride_kg, stride_kn, stride_pg, stride_pn,
    stride_rg, stride_rn, stride_dg, stride_dn,
    G, C, R, D, DV, scale, scale_log2, offset_log2,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    col0 = (pid // G) * BM
    g = pid % G
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = col0 + offs_m < C
    kn_i = load_tile(COLS_KN, g, stride_kg, stride_kn, col0, offs_m, offs_d, valid, D, "")
    vp_i = load_tile(COLS_VP, g, stride_pg, stride_pn, col0, offs_m, offs_v, valid, DV, "")
    acc = load_tile(ACC, g, stride_ag, stride_an, col0, offs_m, offs_v, valid, DV, "")
    dkn = tl.zeros((BM, BD), dtype=tl.float32)
    for r0 in range(0, R, BN):
        rvalid = r0 + offs_n < R
        kn_j = load_tile(ROWS_KN, g, stride_rg, stride_rn, r0, offs_n, offs_d, rvalid, D, "")
        dv_j = load_tile(ROWS_DV, g, stride_dg, stride_dn, r0, offs_n, offs_v, rvalid, DV, "")
        w_t = tl.where(rvalid[None, :], kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION), 0.0)
        acc -= tl.dot(w_t.to(dv_j.dtype), dv_j, input_precision=PRECISION)
        neg_ds_t = tl.dot(vp_i, tl.trans(dv_j), input_precision=PRECISION) * w_t
        dkn -= tl.dot(neg_ds_t.to(kn_j.dtype), kn_j, input_precision=PRECISION)
    store_tile(ACC, g, stride_ag, stride_an, col0, offs_m, offs_v, valid, DV, acc)
    dkn = dkn * scale + load_tile(DKN, g, stride_og, stride_on, col0, offs_m, offs_d, valid, D, "")
    store_tile(DKN, g, stride_og, stride_on, col0, offs_m, offs_d, valid, D, dkn)


@triton.jit
def backward_rows_kernel(
    DKN, ROWS_KN, ROWS_DV, COLS_KN, COLS_VP,
    stride_og, stride_on, stride_rg, stride_rn, stride_dg, stride_dn, stride_kg, stride_kn, stride_pg, stride_pn,
    G, R, C, D, DV, scale, scale_log2, offset_log2,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    row0 = (pid // G) * BM
    g = pid % G
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    valid = row0 + offs_m < R
    kn_i = load_tile(ROWS_KN, g, stride_rg, stride_rn, row0, offs_m, offs_d, valid, D, "")
    dv_i = load_tile(ROWS_DV, g, stride_dg, stride_dn, row0, offs_m, offs_v, valid, DV, "")
    dkn = tl.zeros((BM, BD), dtype=tl.float32)
    for c0 in range(0, C, BN):
        cvalid = c0 + offs_n < C
        kn_j = load_tile(COLS_KN, g, stride_kg, stride_kn, c0, offs_n, offs_d, cvalid, D, "")
        vp_j = load_tile(COLS_VP, g, stride_pg, stride_pn, c0, offs_n, offs_v, cvalid, DV, "")
        w = tl.where(cvalid[None, :], kernel_tile(kn_i, kn_j, scale_log2, offset_log2, PRECISION), 0.0)
        neg_ds = tl.dot(dv_i, tl.trans(vp_j), input_precision=PRECISION) * w
        dkn -= tl.dot(neg_ds.to(kn_j.dtype), kn_j, input_precision=PRECISION)
    dkn = dkn * scale + load_tile(DKN, g, stride_og, stride_on, row0, offs_m, offs_d, valid, D, "")
    store_tile(DKN, g, stride_og, stride_on, row0, offs_m, offs_d, valid, D, dkn)
