"""Host side: block tables, buffers and launches of the kernels in solve.py and cross.py."""

from __future__ import annotations

import math

import torch

from . import cross, solve
from .configs import KernelConfig, config_for, device_arch, operand_dtype, padded, precision
from .tiles import LOG2E


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


ALIGN = 16  # elements: rows of a multiple of 16 let Triton vectorise loads and pipeline them (cp.async)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _rowmajor(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Row-major, with the last dim zero-padded to ``width`` (zero columns change no product)."""
    if width is not None and x.shape[-1] != width:
        return torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x if x.stride(-1) == 1 else x.contiguous()


class _Shape:
    """What every launch needs: config, padded dims, constants of the kernel exp(s x - 1/s)."""

    def __init__(self, dtype, d: int, dv: int, config: KernelConfig | None, device: torch.device):
        self.op = operand_dtype(dtype)
        self.config = config or config_for(self.op, d, dv, device_arch(device))
        self.d, self.dv = aligned(d), aligned(dv)  # what the kernels see; true widths only set the scale
        scale = d**-0.5
        self.scale, self.scale_log2, self.offset_log2 = scale, scale * LOG2E, LOG2E / scale
        products, diagonal = precision(self.op)
        cfg = self.config
        self.common = dict(BD=padded(d), BDV=padded(dv), PRECISION=products, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
        self.solve_meta = dict(BM=cfg.block_m, GROUP=cfg.group, DIAG_PRECISION=diagonal, **self.common)
        self.inverse_meta = dict(BM=cfg.block_m, BD=self.common["BD"], LOG2_BM=int(math.log2(cfg.block_m)),
                                 PRECISION=products, DIAG_PRECISION=diagonal, num_warps=cfg.num_warps)
        self.cross_meta = dict(BM=cfg.block_m, BN=cfg.block_n, **self.common)


def _diagonal_inverses(kn, table, s: _Shape) -> torch.Tensor:
    """[G, blocks, BM, BM] fp32: the inverse of every diagonal block (transient; 4 * BM bytes per row)."""
    g, _, d = kn.shape
    blocks, bm = table.shape[0], s.config.block_m
    inverse = torch.empty(g, blocks, bm, bm, dtype=torch.float32, device=kn.device)
    solve.diagonal_inverse_kernel[(blocks * g,)](
        kn, inverse, table, kn.stride(0), kn.stride(1), blocks, g, d, s.scale_log2, s.offset_log2, **s.inverse_meta,
    )
    return inverse


def _pipeline(kn, segments, s: _Shape):
    """What both ticketed solves need: block table, per-block flags, the ticket counter, diagonal inverses."""
    table = block_table(segments, s.config.block_m, kn.device)
    blocks = table.shape[0]
    flags = torch.zeros(kn.shape[0] * blocks, dtype=torch.int32, device=kn.device)
    counter = torch.zeros(1, dtype=torch.int32, device=kn.device)
    return table, blocks, flags, counter, _diagonal_inverses(kn, table, s)


def solve_forward(kn, v, segments, operand: torch.dtype, config: KernelConfig | None = None) -> torch.Tensor:
    """V' [G, N, Dv] (in the operand dtype of ``operand``) of kn [G, N, D] and v [G, N, Dv] (any float dtype,
    read as fp32: context parallelism and the decode cache pass fp32 accumulators for bf16 models)."""
    g, n, d_true = kn.shape
    dv_true = v.shape[-1]
    s = _Shape(operand, d_true, dv_true, config, kn.device)
    kn, v = _rowmajor(kn.to(s.op), s.d), _rowmajor(v, s.dv)
    table, blocks, flags, counter, inverse = _pipeline(kn, segments, s)
    vp = torch.empty(g, n, s.dv, dtype=s.op, device=kn.device)
    solve.forward_kernel[(blocks * g,)](
        kn, v, vp, inverse, flags, counter, table,
        kn.stride(0), kn.stride(1), v.stride(0), v.stride(1), vp.stride(0), vp.stride(1),
        blocks, g, s.d, s.dv, s.scale_log2, s.offset_log2, **s.solve_meta,
    )
    return vp[..., :dv_true]


def solve_backward(kn, vp, grad_vp, segments, operand: torch.dtype, config: KernelConfig | None = None):
    """(dV in the operand dtype, dKn fp32) of V' = L^{-1} V for the upstream gradient ``grad_vp``."""
    g, n, d_true = kn.shape
    dv_true = vp.shape[-1]
    s = _Shape(operand, d_true, dv_true, config, kn.device)
    kn, vp, grad_vp = _rowmajor(kn.to(s.op), s.d), _rowmajor(vp.to(s.op), s.dv), _rowmajor(grad_vp, s.dv)
    table, blocks, flags, counter, inverse = _pipeline(kn, segments, s)
    grad_v = torch.empty(g, n, s.dv, dtype=s.op, device=kn.device)
    grad_kn = torch.empty(g, n, s.d, dtype=torch.float32, device=kn.device)
    solve.backward_solve_kernel[(blocks * g,)](
        kn, grad_vp, grad_v, inverse, flags, counter, table,
        kn.stride(0), kn.stride(1), grad_vp.stride(0), grad_vp.stride(1), grad_v.stride(0), grad_v.stride(1),
        blocks, g, s.d, s.dv, s.scale_log2, s.offset_log2, **s.solve_meta,
    )
    solve.backward_keys_kernel[(blocks * g,)](
        kn, vp, grad_v, grad_kn, table,
        kn.stride(0), kn.stride(1), vp.stride(0), vp.stride(1), grad_v.stride(0), grad_v.stride(1),
        grad_kn.stride(0), grad_kn.stride(1), g, s.d, s.dv, s.scale, s.scale_log2, s.offset_log2,
        BM=s.config.block_m, **s.common,
    )
    return grad_v[..., :dv_true], grad_kn[..., :d_true]


def _fp32_inplace(target: torch.Tensor, width: int):
    """A row-major fp32 tensor ``width`` wide to accumulate into, and a function writing it back to ``target``."""
    if target.dtype == torch.float32 and target.stride(-1) == 1 and target.shape[-1] == width:
        return target, lambda: None
    work = _rowmajor(target.to(torch.float32), width).contiguous()
    return work, lambda: target.copy_(work[..., : target.shape[-1]])


def subtract_earlier(acc, rows_kn, cols_kn, cols_vp, operand, config: KernelConfig | None = None) -> None:
    """acc [G, R, Dv] -= L[rows, cols] V'_cols, every row after every column; in place."""
    g, r, d = rows_kn.shape
    c = cols_kn.shape[1]
    if r == 0 or c == 0:
        return
    s = _Shape(operand, d, acc.shape[-1], config, acc.device)
    d = s.d
    work, write_back = _fp32_inplace(acc, s.dv)
    rows_kn, cols_kn = (_rowmajor(x.to(s.op), s.d) for x in (rows_kn, cols_kn))
    cols_vp = _rowmajor(cols_vp.to(s.op), s.dv)
    grid = (triton_cdiv(r, s.config.block_m) * g,)
    cross.subtract_kernel[grid](
        work, rows_kn, cols_kn, cols_vp,
        work.stride(0), work.stride(1), rows_kn.stride(0), rows_kn.stride(1), cols_kn.stride(0), cols_kn.stride(1),
        cols_vp.stride(0), cols_vp.stride(1), g, r, c, d, s.dv, s.scale_log2, s.offset_log2, **s.cross_meta,
    )
    write_back()


def backward_earlier(rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows, operand,
                     config: KernelConfig | None = None) -> None:
    """For rows after columns: ``acc_cols -= L^T dV_rows`` and both sides' dKn terms, in place."""
    g, r, d = rows_kn.shape
    c = cols_kn.shape[1]
    if r == 0 or c == 0:
        return
    s = _Shape(operand, d, cols_vp.shape[-1], config, cols_kn.device)
    d = s.d
    rows_kn, cols_kn = (_rowmajor(x.to(s.op), s.d) for x in (rows_kn, cols_kn))
    rows_grad_v, cols_vp = (_rowmajor(x.to(s.op), s.dv) for x in (rows_grad_v, cols_vp))
    acc, write_acc = _fp32_inplace(acc_cols, s.dv)
    dkn_cols, write_cols = _fp32_inplace(grad_kn_cols, s.d)
    dkn_rows, write_rows = _fp32_inplace(grad_kn_rows, s.d)
    bm = s.config.block_m
    cross.backward_cols_kernel[(triton_cdiv(c, bm) * g,)](
        acc, dkn_cols, cols_kn, cols_vp, rows_kn, rows_grad_v,
        acc.stride(0), acc.stride(1), dkn_cols.stride(0), dkn_cols.stride(1), cols_kn.stride(0), cols_kn.stride(1),
        cols_vp.stride(0), cols_vp.stride(1), rows_kn.stride(0), rows_kn.stride(1), rows_grad_v.stride(0),
        rows_grad_v.stride(1), g, c, r, d, s.dv, s.scale, s.scale_log2, s.offset_log2, **s.cross_meta,
    )
    cross.backward_rows_kernel[(triton_cdiv(r, bm) * g,)](
        dkn_rows, rows_kn, rows_grad_v, cols_kn, cols_vp,
        dkn_rows.stride(0), dkn_rows.stride(1), rows_kn.stride(0), rows_kn.stride(1), rows_grad_v.stride(0),
        rows_grad_v.stride(1), cols_kn.stride(0), cols_kn.stride(1), cols_vp.stride(0), cols_vp.stride(1),
        g, r, c, d, s.dv, s.scale, s.scale_log2, s.offset_log2, **s.cross_meta,
    )
    write_acc(), write_cols(), write_rows()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
