"""Argument checking for the public LUCID operators.

Every error names the offending argument, what it was, and what is allowed, so a
user who passes the SDPA layout or an int64 ``cu_seqlens`` knows what to change.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "reference", "blockwise", "triton")

# Input dtypes each backend accepts.  Half types are computed in float32 inside.
BACKEND_DTYPES = {
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "blockwise": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
}


def _require_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _require_4d(name: str, x: torch.Tensor, dims: str) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be 4-D {dims} (flash-attention layout), got shape {tuple(x.shape)}"
        )


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def check_dtype_for_backend(backend: str, dtype: torch.dtype) -> None:
    allowed = BACKEND_DTYPES[backend]
    if dtype not in allowed:
        raise TypeError(
            f"backend={backend!r} does not support dtype {dtype}; allowed: "
            + ", ".join(str(d) for d in allowed)
        )


def check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is not None and (
        not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale must be None or a positive number, got {softmax_scale!r}")


def check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    """k [B, N, Hkv, D], v [B, N, Hkv, Dv]: same batch, length, heads, dtype and device."""
    _require_tensor("k", k)
    _require_tensor("v", v)
    _require_4d("k", k, "[batch, seqlen, kv_heads, head_dim]")
    _require_4d("v", v, "[batch, seqlen, kv_heads, v_head_dim]")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on [batch, seqlen, kv_heads]: k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be positive: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have the same dtype, got k {k.dtype} and v {v.dtype}")
    if k.device != v.device:
        raise ValueError(f"k and v must be on the same device, got k {k.device} and v {v.device}")
    if not k.is_floating_point():
        raise TypeError(f"k and v must be floating point, got {k.dtype}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _require_tensor("q", q)
    _require_4d("q", q, "[batch, seqlen, heads, head_dim]")
    check_kv(k, v)
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q and k must agree on [batch, seqlen]: q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim: q {q.shape[3]}, k {k.shape[3]}")
    hq, hkv = q.shape[2], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads ({hq}) must be a positive multiple of the number of "
            f"key/value heads ({hkv}) (grouped-query attention)"
        )
    if q.dtype != k.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got q {q.dtype} and k {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q, k and v must be on the same device, got q {q.device} and k {k.device}")


def check_cu_seqlens(cu_seqlens, batch: int, seqlen: int) -> list[int] | None:
    """Validate flash-attention style ``cu_seqlens`` and return it as a Python list.

    ``cu_seqlens`` is int32 ``[0, n_1, n_1 + n_2, ..., N]`` for a packed batch of one row.
    """
    if cu_seqlens is None:
        return None
    _require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (as in flash-attention varlen), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries [0, ..., seqlen], got shape {tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch is packed into one row: batch must be 1, got {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            raise ValueError(f"cu_seqlens must be strictly increasing, got {bounds}")
    if bounds[-1] != seqlen:
        raise ValueError(f"cu_seqlens must end at seqlen={seqlen}, got {bounds[-1]}")
    return bounds
