"""Public LUCID operators: backend dispatch around the preconditioner and causal softmax."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import checks
from .blockwise import DEFAULT_BLOCK_COLS, DEFAULT_BLOCK_ROWS
from .flash_blocks import equal_head_dims
from .reference import reference_attention, reference_precondition
from .solver import make_solver, precondition_grouped


@functools.cache
def triton_import_error() -> str | None:
    """None if the Triton kernels (package ``lucid_triton``) can be imported, else why not."""
    try:
        import lucid_triton  # noqa: F401
    except ImportError as err:
        return str(err)
    return None


def resolve_backend(backend: str, device: torch.device, head_dim: int = 0, dtype: torch.dtype = torch.bfloat16) -> str:
    """``auto`` -> the fastest exact backend available for ``device``, head dims up to ``head_dim`` and
    ``dtype`` (the Triton kernels on CUDA where they support the shape, else blockwise)."""
    checks.check_backend(backend)
    if backend == "auto":
        usable = device.type == "cuda" and triton_import_error() is None and dtype != torch.float64
        return "triton" if usable and head_dim <= _triton_max_head_dim(dtype) else "blockwise"
    if backend == "triton":
        if triton_import_error() is not None:
            raise ValueError(
                "backend='triton' needs Triton (pip install 'lucid-megatron[triton]'): "
                f"{triton_import_error()}; use backend='blockwise'"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' runs on CUDA devices (got {device.type}); on CPU only under TRITON_INTERPRET=1 "
                "(slow, for tests); use backend='blockwise'"
            )
    return backend


def _triton_max_head_dim(dtype: torch.dtype) -> int:
    import lucid_triton

    return lucid_triton.max_head_dim(lucid_triton.operand_dtype(dtype))


def _preconditioned_values(k, v, bounds, eps, backend, block_rows, block_cols):
    """V' as [B, H, N, Dv] from the chosen memory-linear backend."""
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block_rows and block_cols must be positive, got {block_rows} and {block_cols}")
    if backend == "triton":
        import lucid_triton

        lucid_triton.check_head_dims(v.dtype, k.shape[-1], v.shape[-1])
    solver = make_solver(backend, v.dtype, block_rows=block_rows, block_cols=block_cols)
    return precondition_grouped(k, v, bounds, eps, solver)


def causal_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal SDPA on ``[B, H, N, D]`` tensors, keeping to the memory-efficient kernels.

    GQA is passed through (``enable_gqa``) instead of repeating K/V.  The fused kernels require
    equal q/k and v head dims: ``equal_head_dims`` zero-pads the narrower side.
    """
    dv = v.shape[-1]
    q, k, v = equal_head_dims(q, k, v)
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return out[..., :dv]


@functools.cache
def _flash_attn():
    """The flash-attn package's varlen entry point, if installed (GPU only)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_attn_usable(q, vp) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] == vp.shape[-1]
            and _flash_attn() is not None)


def _packed_causal_attention(q, k, vp, scale, cu_seqlens):
    """Causal attention per packed document (no attention across documents), ``[B, H, N, D]``.

    On GPU with flash-attn installed, one varlen call covers every document (GQA native); otherwise
    PyTorch SDPA (its flash backend on GPU), one call per document.
    """
    if _flash_attn_usable(q, vp):
        b, h, n, d = q.shape
        bounds = [0, n] if cu_seqlens is None else cu_seqlens
        cu = torch.tensor([r * n + x for r in range(b) for x in bounds[:-1]] + [b * n], dtype=torch.int32,
                          device=q.device)
        flat = lambda x: x.transpose(1, 2).reshape(b * n, x.shape[1], x.shape[-1])  # noqa: E731
        max_len = max(y - x for x, y in zip(bounds, bounds[1:]))
        out = _flash_attn()(flat(q), flat(k), flat(vp), cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
        return out.reshape(b, n, h, -1).transpose(1, 2)
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
    backend = resolve_backend(backend, k.device, max(k.shape[-1], v.shape[-1]), k.dtype)
    checks.check_dtype_for_backend(backend, k.dtype)
    bounds = checks.check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1])
    if backend == "reference":
        return reference_precondition(k, v, bounds, eps)
    return _preconditioned_values(k, v, bounds, eps, backend, DEFAULT_BLOCK_ROWS, DEFAULT_BLOCK_COLS).transpose(1, 2)


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
    preconditioner always uses ``D**-0.5`` as the definition does.  ``block_rows/block_cols`` tune the
    blockwise backend and never change the result beyond round-off.
    """
    checks.check_qkv(q, k, v)
    checks.check_eps(eps)
    checks.check_softmax_scale(softmax_scale)
    backend = resolve_backend(backend, q.device, max(k.shape[-1], v.shape[-1]), q.dtype)
    checks.check_dtype_for_backend(backend, q.dtype)
    bounds = checks.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if backend == "reference":
        return reference_attention(q, k, v, bounds, eps, scale)
    vp = _preconditioned_values(k, v, bounds, eps, backend, block_rows, block_cols)
    out = _packed_causal_attention(q.transpose(1, 2), k.transpose(1, 2), vp, scale, bounds)
    return out.transpose(1, 2).contiguous()
