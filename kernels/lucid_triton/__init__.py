"""Triton kernels for LUCID (GPU; on CPU only under ``TRITON_INTERPRET=1``).

Imported as ``lucid_triton`` (the folder is ``kernels/`` in the repository; the name ``kernels`` itself
belongs to the Hugging Face ``kernels`` package).
"""

from __future__ import annotations

import torch

from .preconditioner import TritonPrecondition, backward, block_table, forward

DEFAULT_BLOCK_M = 32


def precondition_grouped(k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | None = None, eps: float = 1e-6,
                         *, block_m: int = DEFAULT_BLOCK_M) -> torch.Tensor:
    """k [B, N, H, D], v [B, N, H, Dv] -> V' as [B, H, N, Dv] (the layout SDPA wants)."""
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    bsz, n, h, d = k.shape
    if d > 256 or v.shape[-1] > 256:
        raise ValueError(f"the Triton kernels support head dims up to 256, got D={d}, Dv={v.shape[-1]}")
    kf = k.float()
    kn = kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps)
    kn_g = kn.transpose(1, 2).reshape(bsz * h, n, d)
    v_g = v.transpose(1, 2).reshape(bsz * h, n, v.shape[-1])
    segments = [(0, n)] if cu_seqlens is None else list(zip(cu_seqlens, cu_seqlens[1:]))
    vp = TritonPrecondition.apply(kn_g, v_g, segments, block_m)
    return vp.view(bsz, h, n, v.shape[-1])


__all__ = ["DEFAULT_BLOCK_M", "TritonPrecondition", "backward", "block_table", "forward", "precondition_grouped"]
