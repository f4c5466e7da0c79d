"""Every backend against the float64 dense reference: outputs and gradients wrt q, k, v."""

import pytest
import torch

from lucid_megatron.numerics import relative_error
from lucid_megatron.ops import lucid_attention, lucid_precondition

from .oracle import naive_lucid

# (batch, N, Hq, Hkv, D, Dv): N not a multiple of any block size, D in {16, 24, 64, 68, 128},
# Dv != D (smaller and larger), GQA ratios 1, 2, 4, 8, batch > 1.
SHAPES = [
    (3, 1, 2, 2, 16, 16),
    (2, 7, 4, 4, 24, 24),
    (2, 300, 4, 2, 64, 48),
    (1, 300, 8, 1, 68, 68),
    (1, 1000, 4, 1, 128, 128),
    (2, 130, 8, 2, 16, 40),
]
PACKED = [0, 37, 38, 251, 300]  # uneven documents, one of length 1

# Backend variants: small blocks force many row blocks and ragged column chunks.
VARIANTS = {
    "reference": dict(backend="reference"),
    "blockwise": dict(backend="blockwise"),
    "blockwise-small-blocks": dict(backend="blockwise", block_rows=16, block_cols=40),
    "auto": dict(backend="auto"),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# Every (dtype, variant) pair except the float64 reference, which is the oracle itself.
CASES = [
    pytest.param(dtype, variant, id=f"{name}-{variant}")
    for dtype, name in ((torch.float64, "f64"), (torch.float32, "f32"))
    for variant in VARIANTS
    if (dtype, variant) != (torch.float64, "reference")
]


def _inputs(bsz, n, hq, hkv, d, dv, dtype):
    q = torch.randn(bsz, n, hq, d, dtype=torch.float64)
    k = torch.randn(bsz, n, hkv, d, dtype=torch.float64)
    v = torch.randn(bsz, n, hkv, dv, dtype=torch.float64)
    grad_out = torch.randn(bsz, n, hq, dv, dtype=torch.float64)
    return q, k, v, grad_out


def _forward_backward(q, k, v, grad_out, dtype, **kwargs):
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = lucid_attention(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return (out, *grads)


def _check_against_reference(q, k, v, grad_out, dtype, variant, cu_seqlens=None):
    want = _forward_backward(q, k, v, grad_out, torch.float64, backend="reference", cu_seqlens=cu_seqlens)
    got = _forward_backward(q, k, v, grad_out, dtype, cu_seqlens=cu_seqlens, **VARIANTS[variant])
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape
        err = relative_error(g, w)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.3g} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("dtype,variant", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}n{}hq{}hkv{}d{}dv{}".format(*s))
def test_backend_matches_reference(shape, dtype, variant):
    _check_against_reference(*_inputs(*shape, dtype), dtype, variant)


@pytest.mark.parametrize("dtype,variant", CASES)
def test_packed_backend_matches_reference(dtype, variant):
    cu = torch.tensor(PACKED, dtype=torch.int32)
    _check_against_reference(*_inputs(1, PACKED[-1], 4, 2, 24, 20, dtype), dtype, variant, cu)


@pytest.mark.parametrize("variant", ["reference", "blockwise-small-blocks"])
def test_packed_equals_documents_run_alone(variant):
    """A packed row must give exactly what each document gives on its own (fwd and grads)."""
    q, k, v, grad_out = _inputs(1, PACKED[-1], 4, 2, 24, 20, torch.float64)
    cu = torch.tensor(PACKED, dtype=torch.int32)
    packed = _forward_backward(q, k, v, grad_out, torch.float64, cu_seqlens=cu, **VARIANTS[variant])
    for a, b in zip(PACKED, PACKED[1:]):
        alone = _forward_backward(
            q[:, a:b], k[:, a:b], v[:, a:b], grad_out[:, a:b], torch.float64, **VARIANTS[variant]
        )
        for p, s in zip(packed, alone):
            assert relative_error(p[:, a:b], s) < 1e-12


def test_gradcheck_blockwise():
    """Finite differences on the custom backward, with packing, GQA and many tiny blocks."""
    q = torch.randn(1, 11, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 11, 2, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 11, 2, 5, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)

    def fn(q, k, v):
        return lucid_attention(q, k, v, cu_seqlens=cu, backend="blockwise", block_rows=2, block_cols=3)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_precondition_matches_token_loop_oracle(backend):
    """V' of ``lucid_precondition`` against the token-by-token oracle (shares no code with either backend);
    the blockwise backward against the dense reference's autograd."""
    k = torch.randn(2, 150, 3, 24, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 150, 3, 16, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 150, 3, 24, dtype=torch.float64)
    grad = torch.randn(2, 150, 3, 16, dtype=torch.float64)
    got = lucid_precondition(k, v, backend=backend)
    assert got.shape == (2, 150, 3, 16)
    _, oracle_vp = naive_lucid(q, k.detach(), v.detach())
    assert relative_error(got, oracle_vp) < 1e-10
    if backend == "blockwise":
        got_grads = torch.autograd.grad(got, (k, v), grad)
        want_grads = torch.autograd.grad(lucid_precondition(k, v, backend="reference"), (k, v), grad)
        for g, w in zip(got_grads, want_grads):
            assert relative_error(g, w) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision_blockwise(dtype, tol):
    """Half inputs accumulate in float32; the error is that of rounding the inputs and output."""
    q, k, v, grad_out = _inputs(2, 200, 4, 2, 64, 64, dtype)
    q, k, v, grad_out = (x.to(dtype).double() for x in (q, k, v, grad_out))  # exactly representable
    want = _forward_backward(q, k, v, grad_out, torch.float64, backend="reference")
    got = _forward_backward(q, k, v, grad_out, dtype, backend="blockwise")
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert relative_error(g, w) < tol
