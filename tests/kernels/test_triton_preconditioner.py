"""Triton LUCID kernels (interpreted on CPU) against the float64 dense reference."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is an optional extra: pip install '.[triton]'")

import lucid_triton  # noqa: E402
from lucid_megatron.ops import lucid_attention, lucid_precondition  # noqa: E402
from lucid_megatron.ops.attention import resolve_backend  # noqa: E402
from lucid_triton.preconditioner import _forward_kernel, block_table  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3}  # bf16 dot is wrong in the interpreter: GPU-only


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def test_kernels_run_interpreted():
    assert type(_forward_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize(
    "shape,cu",
    [((1, 45, 1, 16, 16), None), ((2, 70, 2, 68, 20), None), ((1, 90, 2, 24, 24), [0, 33, 34, 90])],
    ids=["ragged-n", "d68-dv20-batch2", "packed"],
)
def test_precondition_forward_backward(shape, cu, dtype):
    b, n, h, d, dv = shape
    g = torch.Generator().manual_seed(0)
    k64, v64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64), torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    grad = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    k, v = k64.to(dtype).requires_grad_(), v64.to(dtype).requires_grad_()
    got = lucid_precondition(k, v, cu_seqlens=cu_t, backend="triton")
    got_grads = torch.autograd.grad(got, (k, v), grad.to(dtype))
    # oracle: the float64 reference on exactly the (rounded) inputs the kernel saw
    kr, vr = k.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    want = lucid_precondition(kr, vr, cu_seqlens=cu_t, backend="reference")
    want_grads = torch.autograd.grad(want, (kr, vr), grad.to(dtype).double())
    assert got.dtype == dtype
    for name, a, w in zip(("vp", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
        assert _rel(a, w) < TOLERANCE[dtype], name


def test_lucid_attention_with_gqa_and_packing():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 77, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 77, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 77, 2, 16, generator=g, dtype=torch.float64)
    grad = torch.randn(1, 77, 4, 16, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 30, 77], dtype=torch.int32)
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    got = lucid_attention(*leaves, cu_seqlens=cu, backend="triton")
    got_grads = torch.autograd.grad(got, leaves, grad.float())
    ref_leaves = [x.requires_grad_() for x in (q, k, v)]
    want = lucid_attention(*ref_leaves, cu_seqlens=cu, backend="reference")
    want_grads = torch.autograd.grad(want, ref_leaves, grad)
    for a, w in zip((got, *got_grads), (want, *want_grads)):
        assert _rel(a, w) < 1e-4


def test_block_table_never_crosses_documents():
    table = block_table([(0, 40), (40, 41), (41, 100)], 16, "cpu").tolist()
    assert table == [[0, 16, 0, 2], [16, 16, 0, 2], [32, 8, 0, 2], [40, 1, 3, 3],
                     [41, 16, 4, 7], [57, 16, 4, 7], [73, 16, 4, 7], [89, 11, 4, 7]]


def test_bad_arguments(monkeypatch):
    k = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 24"):
        lucid_triton.precondition_grouped(k, k, block_m=24)
    with pytest.raises(ValueError, match="head dims up to 256, got D=320"):
        lucid_triton.precondition_grouped(torch.randn(1, 8, 1, 320), k)
    with pytest.raises(TypeError, match="backend='triton' does not support dtype torch.float64"):
        lucid_precondition(k.double(), k.double(), backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "blockwise"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA devices"):
        lucid_precondition(k, k, backend="triton")
