"""Triton kernels for LUCID (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Imported as ``lucid_triton`` (the folder is ``kernels/`` in the repository; the name ``kernels`` itself
belongs to the Hugging Face ``kernels`` package).  ``TritonSolver`` is this package's implementation of the
solver interface in ``lucid_megatron.ops.solver``: the operator, context parallelism and the decode cache all
reach the kernels through it.
"""

from __future__ import annotations

import dataclasses

import torch

from . import launch
from .configs import KernelConfig, config_for, max_head_dim, operand_dtype
from .launch import block_table


@dataclasses.dataclass(frozen=True)
class TritonSolver:
    """The LUCID solve and its off-diagonal updates on Triton kernels.

    ``dtype`` is the caller's activation dtype: bf16/fp16 run every product on tensor cores with 16-bit
    operands (fp32 accumulation); fp32 takes the exact path.  ``config`` overrides the launch defaults
    (``configs.config_for``), e.g. smaller blocks for interpreter tests.
    """

    dtype: torch.dtype = torch.bfloat16
    config: KernelConfig | None = None

    def __post_init__(self):
        if self.config is not None:
            check_block_m(self.config.block_m)

    def solve(self, kn, v, segments):
        return launch.solve_forward(kn, v, segments, self.dtype, self.config)

    def solve_backward(self, kn, vp, grad_vp, segments):
        return launch.solve_backward(kn, vp, grad_vp, segments, self.dtype, self.config)

    def subtract_earlier(self, acc, rows_kn, cols_kn, cols_vp) -> None:
        launch.subtract_earlier(acc, rows_kn, cols_kn, cols_vp, self.dtype, self.config)

    def backward_earlier(self, rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows) -> None:
        launch.backward_earlier(rows_kn, rows_grad_v, cols_kn, cols_vp, acc_cols, grad_kn_cols, grad_kn_rows,
                                self.dtype, self.config)


def check_head_dims(dtype: torch.dtype, d: int, dv: int) -> None:
    """Wider heads need other tiles to stay clear of register spills; not compiled in CI, so refused."""
    limit = max_head_dim(operand_dtype(dtype))
    if max(d, dv) > limit:
        raise ValueError(f"the Triton kernels support head dims up to {limit} for {dtype}, got D={d}, Dv={dv}; "
                         "use backend='blockwise'")


def check_block_m(block_m: int) -> None:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")


__all__ = ["KernelConfig", "max_head_dim", "TritonSolver", "block_table", "check_block_m", "check_head_dims", "config_for",
           "operand_dtype"]
