"""Context-parallel LUCID/softmax attention (2 gloo ranks; 4 for a2a+p2p) equals the single-process operator."""

import pytest
import torch

from lucid_megatron.numerics import relative_error
from lucid_megatron.ops import lucid_attention, softmax_attention
from tests.distributed import run_on_ranks

from .cp_workers import cp_attention_rank, cp_hybrid_rank, full_inputs


def _reference(lucid, batch, doc_lengths, hq, hkv, d, dv, dtype):
    q, k, v, grad_out = full_inputs(batch, doc_lengths, hq, hkv, d, dv, dtype)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cu = None
    if len(doc_lengths) > 1:
        cu = torch.tensor([0, *torch.tensor(doc_lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = d**-0.5 * 0.9
    if lucid:
        out = lucid_attention(*leaves, cu_seqlens=cu, softmax_scale=scale, backend="reference")
    else:
        out = softmax_attention(*leaves, cu_seqlens=cu, softmax_scale=scale)
    out.backward(grad_out)
    return dict(out=out.detach(), dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)


def _assemble(results, name):
    first = results[0][name]
    full = torch.empty(first.shape[0], sum(r["positions"].numel() for r in results), *first.shape[2:],
                       dtype=first.dtype)
    for r in results:
        full[:, r["positions"]] = r[name]
    return full


CASES = {
    # name: (batch, padded document lengths, Hq, Hkv, D, Dv)
    "packed-gqa": (1, [40, 24, 36], 4, 2, 16, 16),
    "sbhd-batch2": (2, [52], 4, 2, 16, 16),
    "one-kv-head": (1, [28, 44], 4, 1, 8, 12),
}


@pytest.mark.parametrize("mode,sub_chunks", [("a2a", 1), ("p2p", 1), ("p2p", 3)], ids=["a2a", "p2p", "p2p-sub3"])
@pytest.mark.parametrize("lucid", [True, False], ids=["lucid", "softmax"])
@pytest.mark.parametrize("case", CASES)
def test_cp2_equals_single_process(case, lucid, mode, sub_chunks):
    batch, docs, hq, hkv, d, dv = CASES[case]
    results = run_on_ranks(cp_attention_rank, 2, mode, lucid, batch, docs, hq, hkv, d, dv, torch.float64, sub_chunks)
    want = _reference(lucid, batch, docs, hq, hkv, d, dv, torch.float64)
    for name in ("out", "dq", "dk", "dv"):
        got = _assemble(results, name)
        err = relative_error(got, want[name])
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("mode,sub_chunks", [("p2p", 3), ("a2a", 1)], ids=["p2p-sub3", "a2a"])
def test_cp2_through_the_triton_solver(mode, sub_chunks):
    """The same pipelines with the Triton kernels as the solver (interpreted: TRITON_INTERPRET=1 is inherited
    by the ranks), float32 against the float64 reference."""
    pytest.importorskip("triton", reason="Triton is an optional extra: pip install '.[triton]'")
    batch, docs, hq, hkv, d, dv = CASES["packed-gqa"]
    results = run_on_ranks(cp_attention_rank, 2, mode, True, batch, docs, hq, hkv, d, dv, torch.float32, sub_chunks,
                           "triton")
    want = _reference(True, batch, docs, hq, hkv, d, dv, torch.float64)
    for name in ("out", "dq", "dk", "dv"):
        got = _assemble(results, name).double()
        err = relative_error(got, want[name])
        assert err < 1e-4, f"{name}: relative error {err:.2e}"


# Documents padded for CP = 4 (multiples of 8), each longer than a chunk of the 2 x 4 zigzag.
CP4_CASES = {
    "packed-gqa": (1, [48, 24, 40], 4, 2, 16, 16),
    "sbhd-batch2": (2, [56], 4, 2, 16, 16),
    "one-kv-head": (1, [32, 40], 4, 1, 8, 12),  # replicated to the 2 ranks of the a2a group
}


def test_a2a_p2p_at_cp4_as_2x2_equals_single_process():
    """Heads all-to-all inside pairs of ranks, the pipelined solve across the two pairs (4 gloo processes):
    LUCID with 1 and 2 pipeline units per chunk, and softmax."""
    variants = [(True, 1), (True, 2), (False, 1)]
    results = run_on_ranks(cp_hybrid_rank, 4, 2, variants, list(CP4_CASES.values()), torch.float64)
    for v, (lucid, sub_chunks) in enumerate(variants):
        for c, (case, (batch, docs, hq, hkv, d, dv)) in enumerate(CP4_CASES.items()):
            want = _reference(lucid, batch, docs, hq, hkv, d, dv, torch.float64)
            for name in ("out", "dq", "dk", "dv"):
                got = _assemble([results[r][v * len(CP4_CASES) + c] for r in range(4)], name)
                err = relative_error(got, want[name])
                assert err < 1e-10, f"lucid={lucid} sub_chunks={sub_chunks} {case} {name}: relative error {err:.2e}"
