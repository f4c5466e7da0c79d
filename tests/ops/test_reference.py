"""The dense reference (the oracle of every other test) against the naive token loop."""

import pytest
import torch

from lucid_megatron.numerics import relative_error
from lucid_megatron.ops import lucid_attention, lucid_precondition

from .oracle import naive_lucid


@pytest.mark.parametrize(
    "bsz,n,hq,hkv,d,dv,cu,eps,scale",
    [
        (2, 1, 2, 1, 16, 16, None, 1e-6, None),
        (2, 23, 4, 2, 24, 8, None, 1e-6, None),
        (1, 40, 8, 1, 16, 16, [0, 3, 4, 31, 40], 1e-6, None),
        (1, 30, 2, 2, 8, 12, None, 0.5, 0.2),  # large eps: ||kn||^2 != D, diagonal must still be 1
    ],
)
def test_reference_matches_token_loop(bsz, n, hq, hkv, d, dv, cu, eps, scale):
    q = torch.randn(bsz, n, hq, d, dtype=torch.float64)
    k = torch.randn(bsz, n, hkv, d, dtype=torch.float64)
    v = torch.randn(bsz, n, hkv, dv, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    want_o, want_vp = naive_lucid(q, k, v, cu, eps, scale)
    vp = lucid_precondition(k, v, cu_seqlens=cu_t, eps=eps, backend="reference")
    o = lucid_attention(q, k, v, cu_seqlens=cu_t, eps=eps, softmax_scale=scale, backend="reference")
    assert relative_error(vp, want_vp) < 1e-12
    assert relative_error(o, want_o) < 1e-12
