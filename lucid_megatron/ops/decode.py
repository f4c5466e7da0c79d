"""Incremental LUCID: a per-layer cache of K, normalised K and V', and a step that appends m >= 1 tokens.

For new tokens ``t`` (docs/operator.md, "The math"): ``v'_t = v_t - sum_{j<t} exp(s kn_t.kn_j - 1/s) v'_j``.  A block
of ``m`` tokens is the same blocked forward substitution as training, with the cached rows as an
already solved prefix, so token-by-token decoding, chunked prefill and speculative blocks all agree
with a full prefill to round-off.
"""

from __future__ import annotations

import torch

from . import checks
from .attention import resolve_backend
from .blockwise import compute_dtype, rms_normalize
from .solver import make_solver

# Queries are processed in chunks so the [chunk, T + m] decode mask stays small.
_MASK_ELEMENTS = 1 << 24


class LucidCache:
    """Decode state of one LUCID layer.

    Stores, for ``T`` tokens so far, in ``[B, Hkv, T, .]`` layout: ``k`` (un-normalised, input dtype, for
    the softmax), ``kn`` (RMS-normalised keys) and ``vp`` (V'), the latter two in the compute dtype
    (float32 for half inputs) exactly as the training path keeps them internally.  Storage grows
    geometrically, so appending one token at a time costs amortised O(1) copies.
    """

    def __init__(self, eps: float = 1e-6, backend: str = "auto"):
        checks.check_eps(eps)
        checks.check_backend(backend)
        self.eps = float(eps)
        self.backend = backend  # the solver: auto = Triton kernels on CUDA, blockwise PyTorch elsewhere
        self.length = 0
        self._k = self._kn = self._vp = None

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self.length]

    @property
    def kn(self) -> torch.Tensor | None:
        return None if self._kn is None else self._kn[:, :, : self.length]

    @property
    def vp(self) -> torch.Tensor | None:
        return None if self._vp is None else self._vp[:, :, : self.length]

    def _check_compatible(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._k is None:
            return
        b, h, _, d = self._k.shape
        dv = self._vp.shape[-1]
        expected = (b, h, d, dv, self._k.dtype, self._k.device)
        got = (k.shape[0], k.shape[2], k.shape[3], v.shape[3], k.dtype, k.device)
        if got != expected:
            raise ValueError(
                "new k/v do not match the cache: expected (batch, kv_heads, head_dim, v_head_dim, "
                f"dtype, device) = {expected}, got {got}"
            )

    def _reserve(self, k: torch.Tensor, v: torch.Tensor, total: int) -> None:
        b, _, h, d = k.shape
        dv = v.shape[-1]
        capacity = 0 if self._k is None else self._k.shape[2]
        if total <= capacity:
            return
        new_capacity = max(total, 2 * capacity, 16)
        ct = compute_dtype(k.dtype)
        old = (self._k, self._kn, self._vp)
        self._k = k.new_empty(b, h, new_capacity, d)
        self._kn = k.new_empty(b, h, new_capacity, d, dtype=ct)
        self._vp = k.new_empty(b, h, new_capacity, dv, dtype=ct)
        if old[0] is not None:
            for new, prev in zip((self._k, self._kn, self._vp), old):
                new[:, :, : self.length] = prev[:, :, : self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Solve V' for ``m`` new tokens against the cached prefix and store them.

        ``k [B, m, Hkv, D]``, ``v [B, m, Hkv, Dv]``; returns the new V' as ``[B, Hkv, m, Dv]``.
        """
        checks.check_kv(k, v)
        self._check_compatible(k, v)
        b, m, h, d = k.shape
        dv = v.shape[-1]
        t = self.length
        self._reserve(k, v, t + m)
        kn_new = rms_normalize(k.to(compute_dtype(k.dtype)), self.eps).transpose(1, 2)
        backend = resolve_backend(self.backend, k.device, max(d, dv), v.dtype)
        solver = make_solver("blockwise" if backend == "reference" else backend, v.dtype)
        rows_kn = kn_new.reshape(b * h, m, d)
        acc = v.transpose(1, 2).reshape(b * h, m, dv).to(kn_new.dtype)  # a copy: v is [B, m, H, Dv]
        if t > 0:  # the cached tokens come before every new one
            solver.subtract_earlier(acc, rows_kn, self._kn[:, :, :t].reshape(b * h, t, d),
                                    self._vp[:, :, :t].reshape(b * h, t, dv))
        vp_new = solver.solve(rows_kn, acc, [(0, m)]).to(kn_new.dtype).view(b, h, m, dv)
        self._k[:, :, t : t + m] = k.transpose(1, 2)
        self._kn[:, :, t : t + m] = kn_new
        self._vp[:, :, t : t + m] = vp_new
        self.length = t + m
        return vp_new


def lucid_decode_step(
    cache: LucidCache,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Append ``m >= 1`` tokens to ``cache`` and return their outputs ``o [B, m, Hq, Dv]``.

    Token ``t`` of the block attends to every cached token and to new tokens ``<= t``.
    """
    checks.check_qkv(q, k, v)
    checks.check_softmax_scale(softmax_scale)
    if q.shape[1] == 0:
        raise ValueError("decode step needs at least one new token (q has seqlen 0)")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    past = cache.length
    cache.append(k, v)
    keys = cache.k
    values = cache.vp.to(q.dtype)
    queries = q.transpose(1, 2)  # [B, Hq, m, D]
    m, total = q.shape[1], cache.length
    gqa = queries.shape[1] != keys.shape[1]
    chunk = max(1, _MASK_ELEMENTS // total)
    outputs = []
    key_pos = torch.arange(total, device=q.device)
    for c0 in range(0, m, chunk):
        c1 = min(c0 + chunk, m)
        query_pos = past + torch.arange(c0, c1, device=q.device)
        allowed = key_pos[None, :] <= query_pos[:, None]
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                queries[:, :, c0:c1], keys, values, attn_mask=allowed, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
