"""Softmax attention of one query block against key blocks, merged through log-sum-exp.

Context parallelism needs attention of a query chunk against keys that are not one contiguous causal
square (a non-causal prefix plus a causal diagonal chunk).  Each part runs through PyTorch's fused
flash kernel, which also returns the log-sum-exp of the scores; the parts are merged exactly, and
the backward of each part is the kernel's own backward called with the *merged* output and
log-sum-exp (as ring attention does).  Memory stays linear in the sequence.

The kernels are PyTorch's (private) ATen entry points behind ``scaled_dot_product_attention``:
``_scaled_dot_product_flash_attention_for_cpu`` on CPU, ``_scaled_dot_product_flash_attention`` on
CUDA (half precision only).  Layout here: ``[B, H, L, D]``; queries and keys have equal head counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def equal_head_dims(q, k, v):
    """Equal q/k and v head dims for the fused kernels (their requirement): zero-pad the narrower side.
    Padding q and k changes no dot product; padded value columns are sliced off the output by the caller."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        return q, k, F.pad(v, (0, d - dv))
    if dv > d:
        return F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d)), v
    return q, k, v


def attention_with_lse(q, k, v, *, causal: bool, scale: float):
    """Softmax attention (top-left causal when ``causal``), its rows' log-sum-exp [B, H, L] (float32, or
    float64 for float64 inputs), and what the kernel's backward needs besides (``None`` on CPU)."""
    dv = v.shape[-1]
    q, k, v = equal_head_dims(q, k, v)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        aux = None
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        # (out, lse, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_mask)
        result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        out, lse, aux = result[0], result[1], result[2:8]
    else:
        raise NotImplementedError(
            f"context-parallel attention blocks support CPU tensors and CUDA half/bfloat16, got {q.device} {q.dtype}"
        )
    return out[..., :dv], lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32), aux


def attention_backward(grad_out, q, k, v, out, lse, aux, *, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of one block given the merged output and log-sum-exp of its rows."""
    d, dv = q.shape[-1], v.shape[-1]
    q, k, v = equal_head_dims(q, k, v)
    if dv < d:
        grad_out, out = F.pad(grad_out, (0, d - dv)), F.pad(out, (0, d - dv))
    grad_out, out = grad_out.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    if q.device.type == "cpu":
        # The CPU kernel keeps the log-sum-exp in its accumulation type.
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        dq, dk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, scale=scale
        )
    else:
        cum_q, cum_k, max_q, max_k, seed, offset = aux
        dq, dk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale,
        )
    if dv > d:
        return dq[..., :d], dk[..., :d], dvv
    return dq, dk, dvv[..., :dv]


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine (out, lse) of disjoint key sets into the attention over their union."""
    out, lse = parts[0]
    out = out.to(lse.dtype)
    for o, l in parts[1:]:
        total = torch.logaddexp(lse, l)
        out = out * torch.exp(lse - total)[..., None] + o.to(lse.dtype) * torch.exp(l - total)[..., None]
        lse = total
    return out, lse
