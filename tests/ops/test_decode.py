"""Decoding: full prefill == chunked prefill == token-by-token, to float64 round-off."""

import pytest
import torch

from lucid_megatron.ops import LucidCache, lucid_attention, lucid_decode_step, lucid_precondition
from lucid_megatron.numerics import relative_error

N, HQ, HKV, D, DV = 150, 6, 2, 24, 16


@pytest.fixture
def qkv():
    q = torch.randn(2, N, HQ, D, dtype=torch.float64)
    k = torch.randn(2, N, HKV, D, dtype=torch.float64)
    v = torch.randn(2, N, HKV, DV, dtype=torch.float64)
    return q, k, v


def _decode_in_chunks(q, k, v, sizes, **kwargs):
    cache = LucidCache(eps=kwargs.pop("eps", 1e-6))
    outs, t = [], 0
    for m in sizes:
        outs.append(lucid_decode_step(cache, q[:, t : t + m], k[:, t : t + m], v[:, t : t + m], **kwargs))
        t += m
    assert t == q.shape[1] and cache.length == t
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize(
    "sizes",
    [[1] * N, [N], [7] * 21 + [3], [64, 64, 22], [1, 2, 3, 5, 8, 13, 21, 34, 63]],
    ids=["token-by-token", "one-prefill", "chunks-of-7", "chunks-of-64", "fibonacci"],
)
def test_decode_paths_agree_with_prefill(qkv, sizes):
    q, k, v = qkv
    full = lucid_attention(q, k, v, backend="reference")
    got, cache = _decode_in_chunks(q, k, v, sizes)
    assert relative_error(got, full) < 1e-12
    # The cache holds K as given and V' (not V), in [B, Hkv, T, .] layout.
    assert torch.equal(cache.k, k.transpose(1, 2))
    vp = lucid_precondition(k, v, backend="reference").transpose(1, 2)
    assert relative_error(cache.vp, vp) < 1e-12


def test_decode_matches_blockwise_prefill_in_float32(qkv):
    q, k, v = (x.float() for x in qkv)
    full = lucid_attention(q, k, v, backend="blockwise")
    got, _ = _decode_in_chunks(q, k, v, [1] * 40 + [50, 60], softmax_scale=0.3 * D**-0.5)
    want = lucid_attention(q, k, v, backend="blockwise", softmax_scale=0.3 * D**-0.5)
    assert relative_error(got, want) < 1e-5
    assert not torch.allclose(full, want)  # the scale really reached the softmax


def test_decode_eps_is_the_caches(qkv):
    q, k, v = qkv
    want = lucid_attention(q, k, v, eps=0.3, backend="reference")
    got, _ = _decode_in_chunks(q, k, v, [10] * 15, eps=0.3)
    assert relative_error(got, want) < 1e-12


def test_cache_rejects_mismatched_tokens(qkv):
    q, k, v = qkv
    cache = LucidCache()
    lucid_decode_step(cache, q[:, :3], k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="do not match the cache"):
        lucid_decode_step(cache, q[:1, 3:4], k[:1, 3:4], v[:1, 3:4])
    with pytest.raises(ValueError, match="do not match the cache"):
        lucid_decode_step(cache, q[:, 3:4].float(), k[:, 3:4].float(), v[:, 3:4].float())
    with pytest.raises(ValueError, match="at least one new token"):
        lucid_decode_step(cache, q[:, :0], k[:, :0], v[:, :0])
    assert cache.length == 3
