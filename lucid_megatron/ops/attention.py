"""Public LUCID operators: backend dispatch around the preconditioner and causal softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .blockwise import DEFAULT_BLOCK_COLS, DEFAULT_BLOCK_ROWS, blockwise_precondition_grouped
from .reference import reference_attention, reference_precondition


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> the fastest exact backend available for ``device``."""
    checks.check_backend(backend)
    return "blockwise" if backend == "auto" else backend


def causal_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal SDPA on ``[B, H, N, D]`` tensors, keeping to the memory-efficient kernels.

    GQA is passed through (``enable_gqa``) instead of repeating K/V.  The fused CPU kernel
    requires equal q/k and v head dims, so unequal dims are zero-padded (padding q and k
    changes no dot product; padded value columns are sliced off).
    """
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif dv > d:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return out[..., :dv] if dv < d else out


def _packed_causal_attention(q, k, vp, scale, cu_seqlens):
    """Causal attention per packed document (no attention across documents)."""
    if cu_seqlens is None:
        return causal_softmax_attention(q, k, vp, scale)
    parts = [
        causal_softmax_attention(q[:, :, a:b], k[:, :, a:b], vp[:, :, a:b], scale)
        for a, b in zip(cu_seqlens, cu_seqlens[1:])
    ]
    return torch.cat(parts, dim=2)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Ordinary causal softmax attention with the same layout and packing as :func:`lucid_attention`.

    The baseline of every LUCID-vs-softmax comparison: it shares the layout handling, the packed
    document loop and the SDPA call with the LUCID path, and differs only in ``V' = V``.
    """
    checks.check_qkv(q, k, v)
    checks.check_softmax_scale(softmax_scale)
    bounds = checks.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = _packed_causal_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, bounds
    )
    return out.transpose(1, 2).contiguous()


def lucid_precondition(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """LUCID value preconditioning ``V' = L^{-1} V`` per KV head.

    ``k [B, N, Hkv, D]``, ``v [B, N, Hkv, Dv]`` -> ``V' [B, N, Hkv, Dv]`` (flash-attention layout).
    With ``cu_seqlens`` (int32 ``[0, ..., N]``, ``B == 1``) every packed document is solved alone.
    """
    checks.check_kv(k, v)
    checks.check_eps(eps)
    backend = resolve_backend(backend, k.device)
    checks.check_dtype_for_backend(backend, k.dtype)
    bounds = checks.check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
    if backend == "reference":
        return reference_precondition(k, v, bounds, eps)
    return blockwise_precondition_grouped(k, v, bounds, eps).transpose(1, 2)


def lucid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    eps: float = 1e-6,
    softmax_scale: float | None = None,
    backend: str = "auto",
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_cols: int = DEFAULT_BLOCK_COLS,
) -> torch.Tensor:
    """Causal LUCID attention ``O = softmax_causal(scale q k^T) L^{-1} V``.

    ``q [B, N, Hq, D]``, ``k [B, N, Hkv, D]``, ``v [B, N, Hkv, Dv]`` -> ``o [B, N, Hq, Dv]`` with
    ``Hq % Hkv == 0``.  ``softmax_scale`` (default ``D**-0.5``) scales the softmax only; the
    preconditioner always uses ``D**-0.5`` as in the spec.  ``block_rows/block_cols`` tune the
    blockwise backend and never change the result beyond round-off.
    """
    checks.check_qkv(q, k, v)
    checks.check_eps(eps)
    checks.check_softmax_scale(softmax_scale)
    backend = resolve_backend(backend, q.device)
    checks.check_dtype_for_backend(backend, q.dtype)
    bounds = checks.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        return reference_attention(q, k, v, bounds, eps, scale)
    vp = blockwise_precondition_grouped(
        k, v, bounds, eps, block_rows=block_rows, block_cols=block_cols
    )
    out = _packed_causal_attention(q.transpose(1, 2), k.transpose(1, 2), vp, scale, bounds)
    return out.transpose(1, 2).contiguous()
