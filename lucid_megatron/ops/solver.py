"""One interface to the LUCID solve, whatever computes it: the blockwise PyTorch code or the Triton kernels.

A *solver* works on the grouped layout ``[G, N, X]`` (``G = batch x KV heads``) with normalised keys ``kn``:

* ``solve(kn, v, segments)`` -> ``V' = L^{-1} V`` per segment (packed documents);
* ``solve_backward(kn, vp, grad_vp, segments)`` -> ``(dV, dKn)``;
* ``subtract_earlier(acc, rows_kn, cols_kn, cols_vp)``: ``acc -= L[rows, cols] V'_cols`` in place, for rows
  that all come after the columns (a later context-parallel chunk, new tokens after a decode cache);
* ``backward_earlier(rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows)``: the
  same pair in the backward, ``acc_cols -= L^T dV_rows`` plus both sides' ``dKn`` terms, in place.

The operator (``Precondition``), context parallelism (``parallel.cp_p2p``) and the decode cache
(``ops.decode``) use only these four calls, so a faster solver plugs into all three at once.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch.profiler import record_function

from . import blockwise
from .blockwise import DEFAULT_BLOCK_COLS, DEFAULT_BLOCK_ROWS


class Solver(Protocol):
    def solve(self, kn, v, segments) -> torch.Tensor: ...

    def solve_backward(self, kn, vp, grad_vp, segments) -> tuple[torch.Tensor, torch.Tensor]: ...

    def subtract_earlier(self, acc, rows_kn, cols_kn, cols_vp) -> None: ...

    def backward_earlier(self, rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows) -> None: ...


@dataclasses.dataclass(frozen=True)
class BlockwiseSolver:
    """PyTorch blocks (``ops.blockwise``): any device and dtype, exact in float64; the CPU path."""

    block_rows: int = DEFAULT_BLOCK_ROWS
    block_cols: int = DEFAULT_BLOCK_COLS

    def solve(self, kn, v, segments):
        vp = torch.empty(v.shape, dtype=kn.dtype, device=kn.device)
        for s0, s1 in segments:
            vp[:, s0:s1] = blockwise.solve_forward(kn[:, s0:s1], v[:, s0:s1], block_rows=self.block_rows,
                                                   block_cols=self.block_cols)
        return vp

    def solve_backward(self, kn, vp, grad_vp, segments):
        grad_v = torch.empty(vp.shape, dtype=kn.dtype, device=kn.device)
        grad_kn = torch.empty_like(kn)
        for s0, s1 in segments:
            grad_v[:, s0:s1], grad_kn[:, s0:s1] = blockwise.solve_backward(
                kn[:, s0:s1], vp[:, s0:s1], grad_vp[:, s0:s1], block_rows=self.block_rows, block_cols=self.block_cols)
        return grad_v, grad_kn

    def subtract_earlier(self, acc, rows_kn, cols_kn, cols_vp) -> None:
        scaled = rows_kn * rows_kn.shape[-1] ** -0.5
        for r0 in range(0, rows_kn.shape[1], self.block_rows):  # row blocks keep temporaries block-sized
            r1 = min(r0 + self.block_rows, rows_kn.shape[1])
            blockwise.subtract_kernel_products(acc[:, r0:r1], scaled[:, r0:r1], cols_kn, cols_vp,
                                               block_cols=self.block_cols)

    def backward_earlier(self, rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows) -> None:
        scaled = rows_kn * rows_kn.shape[-1] ** -0.5
        for c0 in range(0, cols_kn.shape[1], self.block_rows):  # column blocks keep temporaries block-sized
            c1 = min(c0 + self.block_rows, cols_kn.shape[1])
            blockwise.backward_off_diagonal(scaled, rows_kn, rows_grad_v, cols_kn[:, c0:c1], cols_vp[:, c0:c1],
                                            acc_cols[:, c0:c1], grad_kn_cols[:, c0:c1], grad_kn_rows,
                                            row_chunk=self.block_cols)


@dataclasses.dataclass(frozen=True)
class NamedSolver:
    """A solver whose calls carry names in profiler traces (``lucid::solve``, ``lucid::solve_backward``, and the
    context-parallel pipeline's ``lucid::solve_earlier`` / ``lucid::solve_backward_earlier``)."""

    inner: Solver

    def solve(self, kn, v, segments):
        with record_function("lucid::solve"):
            return self.inner.solve(kn, v, segments)

    def solve_backward(self, kn, vp, grad_vp, segments):
        with record_function("lucid::solve_backward"):
            return self.inner.solve_backward(kn, vp, grad_vp, segments)

    def subtract_earlier(self, acc, rows_kn, cols_kn, cols_vp) -> None:
        with record_function("lucid::solve_earlier"):
            self.inner.subtract_earlier(acc, rows_kn, cols_kn, cols_vp)

    def backward_earlier(self, *args) -> None:
        with record_function("lucid::solve_backward_earlier"):
            self.inner.backward_earlier(*args)


def make_solver(backend: str, dtype: torch.dtype, *, block_rows: int = DEFAULT_BLOCK_ROWS,
                block_cols: int = DEFAULT_BLOCK_COLS) -> Solver:
    """The solver of a resolved backend (``blockwise`` or ``triton``; see ``attention.resolve_backend``), named
    in profiler traces."""
    if backend == "triton":
        import lucid_triton

        return NamedSolver(lucid_triton.TritonSolver(dtype))
    if backend == "blockwise":
        return NamedSolver(BlockwiseSolver(block_rows, block_cols))
    raise ValueError(f"no solver for backend {backend!r}; allowed: 'blockwise', 'triton'")


class Precondition(torch.autograd.Function):
    """``V' = L^{-1} V`` on grouped tensors through a solver; packed documents are solved independently."""

    @staticmethod
    def forward(ctx, kn, v, segments, solver):
        vp = solver.solve(kn, v, segments)
        ctx.save_for_backward(kn, vp)
        ctx.segments, ctx.solver, ctx.v_dtype = segments, solver, v.dtype
        return vp.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_vp):
        kn, vp = ctx.saved_tensors
        grad_v, grad_kn = ctx.solver.solve_backward(kn, vp, grad_vp, ctx.segments)
        return grad_kn.to(kn.dtype), grad_v.to(ctx.v_dtype), None, None


def precondition_grouped(k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | None, eps: float,
                         solver: Solver) -> torch.Tensor:
    """k [B, N, H, D], v [B, N, H, Dv] -> V' as [B, H, N, Dv] (the layout SDPA wants)."""
    bsz, n, h, d = k.shape
    dv = v.shape[-1]
    kn = blockwise.rms_normalize(k.to(blockwise.compute_dtype(k.dtype)), eps)
    kn_g = kn.transpose(1, 2).reshape(bsz * h, n, d)
    v_g = v.transpose(1, 2).reshape(bsz * h, n, dv)
    segments = [(0, n)] if cu_seqlens is None else list(zip(cu_seqlens, cu_seqlens[1:]))
    return Precondition.apply(kn_g, v_g, segments, solver).view(bsz, h, n, dv)
