"""Triton LUCID kernels, interpreted on CPU, against the float64 operator; their wait protocol checked."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is an optional extra: pip install '.[triton]'")

import lucid_triton  # noqa: E402
import triton.language as tl  # noqa: E402,F401  (Triton wants it visible to the jit function below)
from lucid_megatron.numerics import relative_error  # noqa: E402
from lucid_megatron.ops import LucidCache, lucid_attention, lucid_precondition  # noqa: E402
from lucid_megatron.ops.attention import resolve_backend  # noqa: E402
from lucid_megatron.ops.solver import BlockwiseSolver, precondition_grouped  # noqa: E402
from lucid_triton import KernelConfig, TritonSolver, block_table  # noqa: E402
from lucid_triton import solve as solve_kernels  # noqa: E402

from .happens_before import watch  # noqa: E402

# Small blocks, so that short test sequences have many blocks, and groups of 2 so the grouped wait runs.
SMALL = KernelConfig(block_m=16, block_n=16, group=2, num_warps=4, num_stages=2)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _inputs(b, n, h, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return make(b, n, h, d), make(b, n, h, dv), make(b, h, n, dv)


def _against_float64(k64, v64, grad, cu, dtype, solver):
    """Relative errors (V', dK, dV) of ``solver`` in ``dtype`` against float64 on the same rounded inputs."""
    k, v = k64.to(dtype).requires_grad_(), v64.to(dtype).requires_grad_()
    got = precondition_grouped(k, v, cu, 1e-6, solver)
    got_grads = torch.autograd.grad(got, (k, v), grad.to(dtype))
    kr, vr = k.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    want = precondition_grouped(kr, vr, cu, 1e-6, BlockwiseSolver())
    want_grads = torch.autograd.grad(want, (kr, vr), grad.to(dtype).double())
    assert got.dtype == dtype
    return {name: relative_error(a, w)
            for name, a, w in zip(("vp", "dk", "dv"), (got, *got_grads), (want, *want_grads))}


def test_kernels_run_interpreted():
    assert type(solve_kernels.forward_kernel).__name__ == "InterpretedFunction"


CASES = {
    # name: ((B, N, H, D, Dv), cu_seqlens, dtypes)
    "ragged-n": ((1, 45, 1, 16, 16), None, "all"),
    "d40-dv20-batch2": ((2, 70, 2, 40, 20), None, "all"),
    "d100-dv72": ((1, 50, 1, 100, 72), None, "16-bit"),  # fp32 takes heads up to 64 only
    "packed-with-length-1-docs": ((1, 91, 2, 24, 24), [0, 1, 34, 35, 90, 91], "all"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_solve_forward_backward(case, dtype, bf16_dot):
    shape, cu, dtypes = CASES[case]
    if dtypes == "16-bit" and dtype == torch.float32:
        with pytest.raises(ValueError, match=r"up to 64 for torch.float32, got D=100, Dv=72; use backend='blockwise'"):
            lucid_precondition(torch.randn(1, 8, 1, 100), torch.randn(1, 8, 1, 72), backend="triton")
        return
    errors = _against_float64(*_inputs(*shape), cu, dtype, TritonSolver(dtype, SMALL))
    assert max(errors.values()) < TOLERANCE[dtype], errors


def test_default_configs_and_gqa_through_lucid_attention():
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
        assert relative_error(a, w) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_off_diagonal_updates_match_blockwise(dtype):
    """The two cross-block calls context parallelism and decoding use, against float64 blockwise."""
    g = torch.Generator().manual_seed(2)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    heads, rows, cols, d, dv = 3, 37, 50, 24, 20
    kn = lambda n: torch.nn.functional.normalize(make(heads, n, d), dim=-1) * d**0.5  # noqa: E731
    rows_kn, cols_kn, cols_vp, rows_dv, acc = kn(rows), kn(cols), make(heads, cols, dv), make(heads, rows, dv), make(heads, rows, dv)
    rounded = [x.to(dtype).double() for x in (rows_kn, cols_kn, cols_vp, rows_dv)]
    triton_solver, exact = TritonSolver(dtype, SMALL), BlockwiseSolver(block_rows=8, block_cols=16)

    got, want = acc.float(), acc.clone()
    triton_solver.subtract_earlier(got, rows_kn.float(), cols_kn.float(), cols_vp.float())
    exact.subtract_earlier(want, rounded[0], rounded[1], rounded[2])
    assert relative_error(got, want) < TOLERANCE[dtype]

    acc_cols = make(heads, cols, dv)
    outs = [acc_cols.float(), torch.zeros(heads, cols, d), torch.zeros(heads, rows, d)]
    wants = [acc_cols.clone(), torch.zeros(heads, cols, d, dtype=torch.float64), torch.zeros(heads, rows, d, dtype=torch.float64)]
    triton_solver.backward_earlier(rows_kn.float(), rows_dv.float(), cols_kn.float(), cols_vp.float(), *outs)
    exact.backward_earlier(rounded[0], rounded[3], rounded[1], rounded[2], *wants)
    for name, a, w in zip(("acc_cols", "dkn_cols", "dkn_rows"), outs, wants):
        assert relative_error(a, w) < TOLERANCE[dtype], name


def test_solver_keeps_its_operand_dtype_for_fp32_accumulators():
    """Context parallelism and the decode cache hand the solver fp32 accumulators (V minus earlier terms) for a
    16-bit model: the solve must stay on the model's 16-bit path (D = 128 exists only there), not fall to fp32."""
    g = torch.Generator().manual_seed(5)
    kn = torch.nn.functional.normalize(torch.randn(2, 40, 128, generator=g, dtype=torch.float64), dim=-1) * 128**0.5
    acc = torch.randn(2, 40, 24, generator=g, dtype=torch.float64)
    kn16 = kn.half().double()
    got = TritonSolver(torch.float16, SMALL).solve(kn.float(), acc.float(), [(0, 40)])
    assert got.dtype == torch.float16
    want = BlockwiseSolver().solve(kn16, acc, [(0, 40)])
    assert relative_error(got, want) < TOLERANCE[torch.float16]
    dv, dkn = TritonSolver(torch.float16, SMALL).solve_backward(kn.float(), want.float(), acc.float(), [(0, 40)])
    assert dv.dtype == torch.float16 and dkn.dtype == torch.float32


def test_decode_cache_through_triton_equals_prefill():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, h, 16, generator=g) for h in (4, 2, 2))
    full = lucid_attention(q.double(), k.double(), v.double(), backend="reference")
    cache = LucidCache(backend="triton")
    steps = [lucid_attention_step(cache, q, k, v, a, b) for a, b in ((0, 17), (17, 18), (18, 40))]
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-4


def lucid_attention_step(cache, q, k, v, a, b):
    from lucid_megatron.ops import lucid_decode_step

    return lucid_decode_step(cache, q[:, a:b], k[:, a:b], v[:, a:b])


# ---- the wait protocol ---------------------------------------------------------------------------------

@triton.jit
def _no_wait(flag_ptr):
    pass


def _protocol_run(dtype=torch.float32):
    """Forward and backward over 2 heads, a 9-block document (grouped waits and tail) and a 3-block one."""
    k, v, grad = _inputs(1, 16 * 9 + 40, 2, 16, 16, seed=4)
    k, v = k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    vp = precondition_grouped(k, v, [0, 16 * 9, 16 * 9 + 40], 1e-6, TritonSolver(dtype, SMALL))
    return (vp.detach(), *torch.autograd.grad(vp, (k, v), grad.to(dtype)))


def test_every_cross_program_read_is_ordered_by_a_wait():
    with watch() as checker:
        _protocol_run()
    assert checker.launches == 5  # inverse + forward; inverse + dV solve + dKn
    assert checker.acquires > 0 and checker.plain_loads_checked > 0
    assert checker.races == []


def test_a_missing_wait_is_caught(monkeypatch):
    """The numbers cannot show it (the interpreter runs programs in ticket order): the checker does."""
    with watch() as checker:
        reference = _protocol_run()
    assert checker.races == []
    monkeypatch.setattr(solve_kernels, "wait_published", _no_wait)
    with watch() as checker:
        unsynchronised = _protocol_run()
    for a, b in zip(reference, unsynchronised):
        assert torch.equal(a, b)
    readers = {race.reader for race in checker.races}
    assert len(readers) > 4, checker.races[:3]


# ---- host side ------------------------------------------------------------------------------------------

def test_block_table_never_crosses_documents():
    table = block_table([(0, 40), (40, 41), (41, 100)], 16, "cpu").tolist()
    assert table == [[0, 16, 0, 2], [16, 16, 0, 2], [32, 8, 0, 2], [40, 1, 3, 3],
                     [41, 16, 4, 7], [57, 16, 4, 7], [73, 16, 4, 7], [89, 11, 4, 7]]


def test_bad_arguments(monkeypatch):
    k = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 24"):
        lucid_triton.check_block_m(24)
    with pytest.raises(ValueError, match="head dims up to 128 for torch.float16, got D=160"):
        lucid_precondition(torch.randn(1, 8, 1, 160).half(), k.half(), backend="triton")
    assert resolve_backend("auto", torch.device("cuda"), 160) == "blockwise"  # auto never picks what is refused
    assert resolve_backend("auto", torch.device("cuda"), 128, torch.float32) == "blockwise"
    with pytest.raises(TypeError, match="backend='triton' does not support dtype torch.float64"):
        lucid_precondition(k.double(), k.double(), backend="triton")
    assert resolve_backend("auto", torch.device("cpu")) == "blockwise"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA devices"):
        lucid_precondition(k, k, backend="triton")
