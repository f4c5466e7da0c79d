"""Bad input is refused with an error that names the argument and what is allowed."""

import pytest
import torch

from lucid_megatron.ops import lucid_attention, lucid_precondition


def _qkv(bsz=1, n=8, hq=4, hkv=2, d=8, dv=8, dtype=torch.float32):
    return (
        torch.randn(bsz, n, hq, d, dtype=dtype),
        torch.randn(bsz, n, hkv, d, dtype=dtype),
        torch.randn(bsz, n, hkv, dv, dtype=dtype),
    )


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D \[batch, seqlen, heads, head_dim\]"):
        lucid_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"v must be 4-D"):
        lucid_precondition(k, v[0])


def test_wrong_layout():
    q, k, v = _qkv(n=8, hq=4)
    with pytest.raises(ValueError, match=r"q and k must agree on \[batch, seqlen\]"):
        lucid_attention(q.transpose(1, 2), k, v)  # SDPA layout [B, H, N, D] by mistake
    with pytest.raises(ValueError, match="same head_dim"):
        lucid_attention(q[..., :4], k, v)
    with pytest.raises(ValueError, match=r"k and v must agree on \[batch, seqlen, kv_heads\]"):
        lucid_attention(q, k, v[:, :5])


def test_heads_not_divisible():
    q, k, v = _qkv(hq=5, hkv=2)
    with pytest.raises(ValueError, match=r"query heads \(5\) must be a positive multiple .* \(2\)"):
        lucid_attention(q, k, v)


def test_mismatched_dtypes_and_devices():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="same dtype"):
        lucid_attention(q.double(), k, v)
    with pytest.raises(TypeError, match="k and v must have the same dtype"):
        lucid_precondition(k, v.double())
    with pytest.raises(ValueError, match="same device"):
        lucid_attention(q.to("meta"), k, v)


def test_unsupported_dtype():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="floating point"):
        lucid_attention(q.long(), k.long(), v.long())
    f8 = [x.to(torch.float8_e4m3fn) for x in (q, k, v)]
    for backend in ("reference", "blockwise", "auto"):
        with pytest.raises(TypeError, match="does not support dtype torch.float8_e4m3fn; allowed: torch.float16"):
            lucid_attention(*f8, backend=backend)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        lucid_attention(q.tolist(), k, v)


def test_unknown_backend_and_bad_scalars():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"backend='flash' is not one of \('auto', 'reference', 'blockwise', 'triton'\)"):
        lucid_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        lucid_attention(q, k, v, eps=0)
    with pytest.raises(ValueError, match="softmax_scale must be None or a positive number"):
        lucid_attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="block_rows and block_cols must be positive"):
        lucid_attention(q, k, v, backend="blockwise", block_rows=0)


@pytest.mark.parametrize(
    "cu,bsz,error,match",
    [
        ([0, 3, 3, 8], 1, ValueError, r"strictly increasing, got \[0, 3, 3, 8\]"),
        ([0, 5, 3, 8], 1, ValueError, "strictly increasing"),
        ([0, 3, 7], 1, ValueError, "must end at seqlen=8, got 7"),
        ([1, 3, 8], 1, ValueError, "must start at 0, got 1"),
        ([0, 8], 2, ValueError, "batch must be 1, got 2"),
        ([8], 1, ValueError, "at least 2 entries"),
    ],
)
def test_bad_cu_seqlens(cu, bsz, error, match):
    q, k, v = _qkv(bsz=bsz)
    for backend in ("reference", "blockwise"):
        with pytest.raises(error, match=match):
            lucid_attention(q, k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), backend=backend)
        with pytest.raises(error, match=match):
            lucid_precondition(k, v, cu_seqlens=torch.tensor(cu, dtype=torch.int32), backend=backend)


def test_cu_seqlens_must_be_int32():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="cu_seqlens must be int32 .* got torch.int64"):
        lucid_attention(q, k, v, cu_seqlens=torch.tensor([0, 8]))
