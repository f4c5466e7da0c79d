"""One-call GPU check of the Triton LUCID kernels: correctness, then speed against causal flash attention.

    python benchmarks/bench_kernels_gpu.py                 # on one H100/H200, well under 5 minutes
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py --cpu-smoke   # the same code paths on CPU

1. Correctness: preconditioner forward and backward (Triton) against the float64 dense reference on small
   shapes (fp32 and bf16; ragged N, D = 68, GQA through lucid_attention, packed cu_seqlens).
2. Speed (bf16): preconditioner forward and backward vs the causal SDPA flash forward and backward of the
   same shape (B, H, N, D), as ratios, with TFLOP/s and the peak memory of each.
Not a test; it prints a markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

# (batch, heads, seqlen, head dim): from B=1..8, H=8..32, N=2K..32K, D=64/128
SHAPES = [
    (1, 8, 2048, 64), (1, 8, 8192, 64), (1, 8, 8192, 128), (1, 32, 8192, 128), (8, 8, 8192, 128),
    (1, 8, 16384, 128), (4, 16, 16384, 128), (1, 8, 32768, 128), (1, 32, 32768, 64),
]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def correctness(device, dtypes) -> list[str]:
    from lucid_megatron.ops import lucid_attention, lucid_precondition

    failures = []
    g = torch.Generator().manual_seed(0)
    cases = [((1, 300, 2, 64, 64), None), ((2, 129, 1, 68, 68), None), ((1, 200, 2, 128, 128), [0, 77, 78, 200])]
    for (b, n, h, d, dv), cu in cases:
        for dtype in dtypes:
            k64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
            v64 = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
            grad = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
            k, v = (x.to(device, dtype).requires_grad_() for x in (k64, v64))
            got = lucid_precondition(k, v, cu_seqlens=cu_t, backend="triton")
            got_grads = torch.autograd.grad(got, (k, v), grad.to(device, dtype))
            kr, vr = (x.detach().double().cpu().requires_grad_() for x in (k, v))
            want = lucid_precondition(kr, vr, cu_seqlens=None if cu is None else cu_t.cpu(), backend="reference")
            want_grads = torch.autograd.grad(want, (kr, vr), grad.to(dtype).double())
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            errors = [_rel(a.cpu(), w) for a, w in zip((got, *got_grads), (want, *want_grads))]
            status = "ok" if max(errors) < tol else "FAIL"
            print(f"  precondition {str(dtype):15s} N={n:4d} D={d:3d} cu={cu}: rel err fwd {errors[0]:.1e} "
                  f"dk {errors[1]:.1e} dv {errors[2]:.1e} (tol {tol:g}) {status}", flush=True)
            if status != "ok":
                failures.append(f"precondition {dtype} N={n} D={d}")
    # GQA through the full operator (softmax part included)
    q = torch.randn(1, 257, 8, 64, generator=g, dtype=torch.float64)
    kv = torch.randn(1, 257, 2, 64, generator=g, dtype=torch.float64)
    for dtype in dtypes:
        leaves = [x.to(device, dtype).requires_grad_() for x in (q, kv, kv.flip(1))]
        out = lucid_attention(*leaves, backend="triton")
        ref = lucid_attention(*[x.detach().double().cpu() for x in leaves], backend="reference")
        err = _rel(out.cpu(), ref)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        print(f"  lucid_attention GQA 8:2 {str(dtype):15s}: rel err {err:.1e} {'ok' if err < tol else 'FAIL'}")
        if err >= tol:
            failures.append(f"lucid_attention {dtype}")
    return failures


def _time(fn, device, repeats=5):
    """Median milliseconds of fn() and the peak memory it allocated."""
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    return 1e3 * sorted(times)[len(times) // 2], peak


def speed(device, shapes, budget_s: float) -> None:
    import lucid_triton

    print("\n| B | H | N | D | precond fwd ms | flash fwd ms | fwd ratio | precond bwd ms | flash bwd ms | bwd ratio "
          "| precond fwd TFLOP/s | precond bwd TFLOP/s | precond peak MiB | flash peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    started = time.monotonic()
    for b, h, n, d in shapes:
        if time.monotonic() - started > budget_s:
            print(f"(stopped: time budget of {budget_s:.0f} s used)")
            break
        dtype = torch.bfloat16
        k = torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
        q = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, h, n, d, device=device, dtype=dtype)

        def pre_fwd():
            with torch.no_grad():
                return lucid_triton.precondition_grouped(k, v)

        def pre_bwd():
            out = lucid_triton.precondition_grouped(k, v)
            out.backward(grad)

        kt, vt = k.detach().transpose(1, 2).requires_grad_(), v.detach().transpose(1, 2).requires_grad_()

        def flash_fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, kt, vt, is_causal=True)

        def flash_bwd():
            F.scaled_dot_product_attention(q, kt, vt, is_causal=True).backward(grad)

        pf, pf_mem = _time(pre_fwd, device)
        ff, ff_mem = _time(flash_fwd, device)
        pb_total, pb_mem = _time(pre_bwd, device)
        fb_total, fb_mem = _time(flash_bwd, device)
        pb, fb = pb_total - pf, fb_total - ff  # backward alone
        half = n * n / 2 * d * 2 * b * h  # one causal half-square matmul, in FLOPs
        print(f"| {b} | {h} | {n} | {d} | {pf:.2f} | {ff:.2f} | {pf / ff:.2f} | {pb:.2f} | {fb:.2f} | {pb / fb:.2f} "
              f"| {2 * half / pf / 1e9:.0f} | {5 * half / pb / 1e9:.0f} | {max(pf_mem, pb_mem) / 2**20:.0f} "
              f"| {max(ff_mem, fb_mem) / 2**20:.0f} |", flush=True)
        del k, v, q, grad, kt, vt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget", type=float, default=200.0, help="seconds for the speed table")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        device, dtypes, shapes = torch.device("cpu"), [torch.float32], [(1, 2, 64, 16)]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --cpu-smoke with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        device, dtypes, shapes = torch.device("cuda"), [torch.float32, torch.bfloat16], SHAPES
        print(f"# {time.strftime('%Y-%m-%d')} | {torch.cuda.get_device_name()} | torch {torch.__version__}")
    import triton

    print(f"# triton {triton.__version__}\ncorrectness against the float64 reference:")
    failures = correctness(device, dtypes)
    speed(device, shapes if not args.cpu_smoke else [(1, 2, 64, 16)], args.budget)
    print("\ncorrectness: " + ("all ok" if not failures else "FAILED: " + ", ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
