"""A second, deliberately naive LUCID oracle: token-by-token forward substitution in float64.

Written from the decode rule (docs/operator.md, "The math"), not from the dense reference, so that the two
independent definitions check each other.
"""

import math

import torch


def naive_lucid(q, k, v, cu_seqlens=None, eps=1e-6, softmax_scale=None):
    """q [B, N, Hq, D], k [B, N, Hkv, D], v [B, N, Hkv, Dv] -> (o, v') in float64."""
    q, k, v = q.double(), k.double(), v.double()
    bsz, n, hq, d = q.shape
    hkv = k.shape[2]
    s = 1.0 / math.sqrt(d)
    scale = s if softmax_scale is None else softmax_scale
    starts = [0] * n
    if cu_seqlens is not None:
        bounds = [int(x) for x in cu_seqlens]
        for a, b in zip(bounds, bounds[1:]):
            for t in range(a, b):
                starts[t] = a
    vp = torch.zeros_like(v)
    out = torch.zeros(bsz, n, hq, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(hkv):
            kn = [k[b, t, h] / torch.sqrt((k[b, t, h] ** 2).mean() + eps) for t in range(n)]
            for t in range(n):
                acc = v[b, t, h].clone()
                for j in range(starts[t], t):
                    acc -= torch.exp(s * torch.dot(kn[t], kn[j]) - 1.0 / s) * vp[b, j, h]
                vp[b, t, h] = acc
        for hh in range(hq):
            h = hh // (hq // hkv)
            for t in range(n):
                keys = k[b, starts[t] : t + 1, h]
                weights = torch.softmax(scale * (keys @ q[b, t, hh]), dim=0)
                out[b, t, hh] = weights @ vp[b, starts[t] : t + 1, h]
    return out, vp
