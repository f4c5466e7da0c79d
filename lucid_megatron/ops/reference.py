"""Dense LUCID: the definition (docs/operator.md, "The math"), written for clarity, used as the test oracle.

It materialises N x N matrices (O(N^2) memory) and relies on PyTorch autograd for
gradients.  It shares no code with the blockwise path on purpose.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_document(seqlen: int, cu_seqlens: list[int] | None, device) -> torch.Tensor:
    """[N, N] bool: True where query i and key j belong to the same packed document."""
    if cu_seqlens is None:
        return torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    lengths = torch.tensor([b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])], device=device)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return doc[:, None] == doc[None, :]


def reference_precondition(
    k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """V' = L^{-1} V per KV head, with L_ij = exp(s kn_i.kn_j - 1/s) (j < i), L_ii = 1."""
    ct = _compute_dtype(k.dtype)
    kf = k.to(ct).transpose(1, 2)  # [B, H, N, D]
    vf = v.to(ct).transpose(1, 2)  # [B, H, N, Dv]
    n, d = kf.shape[-2], kf.shape[-1]
    s = d**-0.5
    kn = kf / torch.sqrt(kf.pow(2).mean(-1, keepdim=True) + eps)
    strictly_lower = torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)
    keep = strictly_lower & _same_document(n, cu_seqlens, k.device)
    off_diag = torch.exp(s * (kn @ kn.transpose(-1, -2)) - 1.0 / s) * keep
    lower = off_diag + torch.eye(n, dtype=ct, device=k.device)  # diagonal exactly 1
    vp = torch.linalg.solve_triangular(lower, vf, upper=False)
    return vp.transpose(1, 2).to(v.dtype)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: list[int] | None = None,
    eps: float = 1e-6,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """O = softmax_causal(scale q k^T) V' with V' from :func:`reference_precondition`."""
    ct = _compute_dtype(q.dtype)
    vp = reference_precondition(k, v, cu_seqlens, eps).to(ct)
    group = q.shape[2] // k.shape[2]
    qf = q.to(ct).transpose(1, 2)
    kf = k.to(ct).repeat_interleave(group, dim=2).transpose(1, 2)
    vpf = vp.repeat_interleave(group, dim=2).transpose(1, 2)
    n = q.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() & _same_document(
        n, cu_seqlens, q.device
    )
    scores = (scale * (qf @ kf.transpose(-1, -2))).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vpf
    return out.transpose(1, 2).to(q.dtype)
