"""Memory-linear LUCID preconditioner in plain PyTorch blocks.

Tensors here use the "grouped" layout ``[G, N, D]`` with ``G = batch * kv_heads``; every
block operation is a batched matmul over ``G``.  Kernel blocks
``exp(s * kn_rows . kn_cols - 1/s)`` are built on the fly, ``block_rows x block_cols`` at a
time, so neither the forward nor the backward ever holds an ``N x N`` matrix: memory is
``O(N * D + G * block_rows * block_cols)``.  See docs/operator.md for the derivation.
"""

from __future__ import annotations

import torch

# Tuned on a 2-core x86 CPU (benchmarks/bench_operator.py); any positive values are exact.
DEFAULT_BLOCK_ROWS = 128
DEFAULT_BLOCK_COLS = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate half types in float32; keep float64 for the oracle-grade tests."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_normalize(k: torch.Tensor, eps: float) -> torch.Tensor:
    """kn = k / sqrt(mean(k^2) + eps), no learnable weight (docs/operator.md, "The math")."""
    return k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)


def _kernel_block(rows_scaled: torch.Tensor, cols: torch.Tensor, inv_scale: float) -> torch.Tensor:
    """exp(s * kn_r . kn_c - 1/s) for a block, given rows already multiplied by s."""
    return torch.bmm(rows_scaled, cols.transpose(1, 2)).sub_(inv_scale).exp_()


def subtract_kernel_products(
    acc: torch.Tensor,
    rows_scaled: torch.Tensor,
    cols_kn: torch.Tensor,
    cols_vp: torch.Tensor,
    *,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> None:
    """``acc -= L[rows, cols] @ V'[cols]`` in place, for rows that all come after the columns.

    ``rows_scaled`` are the rows' normalised keys times ``s``; blocks of ``block_cols`` columns keep
    the temporary kernel block at ``rows x block_cols``.
    """
    inv_scale = rows_scaled.shape[-1] ** 0.5
    for c0 in range(0, cols_kn.shape[1], block_cols):
        c1 = min(c0 + block_cols, cols_kn.shape[1])
        weights = _kernel_block(rows_scaled, cols_kn[:, c0:c1], inv_scale)
        acc.baddbmm_(weights, cols_vp[:, c0:c1], alpha=-1.0)


def backward_off_diagonal(
    rows_kn_scaled: torch.Tensor,
    rows_kn: torch.Tensor,
    rows_grad_v: torch.Tensor,
    cols_kn: torch.Tensor,
    cols_vp: torch.Tensor,
    acc_cols: torch.Tensor,
    grad_kn_cols: torch.Tensor,
    grad_kn_rows: torch.Tensor,
    *,
    row_chunk: int = DEFAULT_BLOCK_COLS,
) -> None:
    """The backward's work for rows ``j`` that come after columns ``i`` (all in place).

    With ``W = L[j, i]``: ``acc_i -= W^T dV_j`` (the upper-triangular solve), and
    ``dS = -(dV_j V'_i^T) * W`` feeds ``dKn_i += s dS^T Kn_j`` and ``dKn_j += s dS Kn_i``.
    Rows are taken ``row_chunk`` at a time, so the temporaries are ``row_chunk x cols``.
    """
    scale = rows_kn.shape[-1] ** -0.5
    for r0 in range(0, rows_kn.shape[1], row_chunk):
        r1 = min(r0 + row_chunk, rows_kn.shape[1])
        weights = _kernel_block(rows_kn_scaled[:, r0:r1], cols_kn, 1.0 / scale)  # L[j, i]
        grad_v_rows = rows_grad_v[:, r0:r1]
        acc_cols.baddbmm_(weights.transpose(1, 2), grad_v_rows, alpha=-1.0)
        # -dS[j, i]; the minus sign is folded into alpha below.
        neg_ds = torch.bmm(grad_v_rows, cols_vp.transpose(1, 2)).mul_(weights)
        grad_kn_rows[:, r0:r1].baddbmm_(neg_ds, cols_kn, alpha=-scale)
        grad_kn_cols.baddbmm_(neg_ds.transpose(1, 2), rows_kn[:, r0:r1], alpha=-scale)


def solve_forward(
    kn: torch.Tensor,
    v: torch.Tensor,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
    prefix_kn: torch.Tensor | None = None,
    prefix_vp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocked forward substitution ``V' = L^{-1} V`` for one causal sequence.

    ``kn [G, N, D]`` (normalised keys, compute dtype), ``v [G, N, Dv]``.  When
    ``prefix_kn/prefix_vp [G, P, .]`` are given, the new rows also see ``P`` earlier, already
    solved rows (decode cache, chunked prefill).  Returns ``V' [G, N, Dv]`` in ``kn.dtype``.
    """
    g, n, d = kn.shape
    scale = d**-0.5
    inv_scale = 1.0 / scale
    kn_scaled = kn * scale
    vp = torch.empty(g, n, v.shape[-1], dtype=kn.dtype, device=kn.device)
    sources = [] if prefix_kn is None else [(prefix_kn, prefix_vp, prefix_kn.shape[1])]
    for a in range(0, n, block_rows):
        b = min(a + block_rows, n)
        rows = kn_scaled[:, a:b]
        acc = v[:, a:b].to(kn.dtype, copy=True)
        # Off-diagonal part: subtract L[a:b, j] V'[j] for every earlier, already solved row j.
        for src_kn, src_vp, end in sources + [(kn, vp, a)]:
            subtract_kernel_products(acc, rows, src_kn[:, :end], src_vp[:, :end], block_cols=block_cols)
        # Diagonal block: unit lower-triangular solve; trsm never reads the diagonal of
        # `diag`, so L_ii is exactly 1 as the definition requires.
        diag = _kernel_block(rows, kn[:, a:b], inv_scale)
        vp[:, a:b] = torch.linalg.solve_triangular(diag, acc, upper=False, unitriangular=True)
    return vp


def solve_backward(
    kn: torch.Tensor,
    vp: torch.Tensor,
    grad_vp: torch.Tensor,
    *,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``V' = L^{-1} V`` wrt ``V`` and ``Kn`` (docs/operator.md, "The math"), blockwise.

    Walks column blocks ``i`` from last to first.  Block ``i`` of ``dV = L^{-T} G`` needs
    ``dV`` of all later rows ``c``; the same kernel block ``L[c, i]`` then gives
    ``dS[c, i] = -(dV_c V'_i^T) * L[c, i]``, which feeds ``dKn_c`` and ``dKn_i``.
    """
    g, n, d = kn.shape
    scale = d**-0.5
    inv_scale = 1.0 / scale
    kn_scaled = kn * scale
    grad_v = torch.empty(g, n, vp.shape[-1], dtype=kn.dtype, device=kn.device)
    grad_kn = torch.zeros_like(kn)
    for a in reversed(range(0, n, block_rows)):
        b = min(a + block_rows, n)
        kn_i, vp_i = kn[:, a:b], vp[:, a:b]
        acc = grad_vp[:, a:b].to(kn.dtype, copy=True)
        grad_kn_i = grad_kn[:, a:b]
        backward_off_diagonal(
            kn_scaled[:, b:], kn[:, b:], grad_v[:, b:], kn_i, vp_i, acc, grad_kn_i, grad_kn[:, b:],
            row_chunk=block_cols,  # the later rows play the role the columns play in the forward
        )
        diag = _kernel_block(kn_scaled[:, a:b], kn_i, inv_scale)
        grad_v_i = torch.linalg.solve_triangular(
            diag.transpose(1, 2), acc, upper=True, unitriangular=True
        )
        grad_v[:, a:b] = grad_v_i
        # Diagonal block: only the strictly lower entries depend on Kn (L_ii is constant 1).
        neg_ds = torch.bmm(grad_v_i, vp_i.transpose(1, 2)).mul_(diag).tril_(-1)
        grad_kn_i.baddbmm_(neg_ds, kn_i, alpha=-scale)
        grad_kn_i.baddbmm_(neg_ds.transpose(1, 2), kn_i, alpha=-scale)
    return grad_v, grad_kn
