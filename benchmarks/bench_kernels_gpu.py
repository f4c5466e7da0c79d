"""GPU check of the Triton LUCID kernels over more shapes than the acceptance run: correctness, then speed.

    python benchmarks/bench_kernels_gpu.py                 # on one H100/H200, well under 5 minutes
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py --cpu-smoke   # the same code paths on CPU

Correctness and timing are the acceptance run's own (``lucid_megatron.selftest.parts``); this script sweeps
(B, H, N, D) from B=1..8, H=8..32, N=2K..32K, D=64/128 in bf16 and prints a markdown table of
preconditioner vs causal flash attention (forward, backward, ratios, TFLOP/s, peak memory). Not a test.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lucid_megatron.selftest.parts.base import Status
from lucid_megatron.selftest.parts.kernels import check_kernels
from lucid_megatron.selftest.parts.timings import time_preconditioner

SHAPES = [
    (1, 8, 2048, 64), (1, 8, 8192, 64), (1, 8, 8192, 128), (1, 32, 8192, 128), (8, 8, 8192, 128),
    (1, 8, 16384, 128), (4, 16, 16384, 128), (1, 8, 32768, 128), (1, 32, 32768, 64),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget", type=float, default=200.0, help="seconds for the speed table")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --cpu-smoke with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    shapes = [(1, 2, 64, 16)] if args.cpu_smoke else SHAPES
    import triton

    name = "CPU" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"# {time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__} | triton {triton.__version__}")
    kernels = check_kernels(device, args.cpu_smoke)
    for c in kernels.cases:
        print(f"  {c.case:22s} {c.dtype:9s} rel err V' {c.out:.1e} dK {c.dk:.1e} dV {c.dv:.1e} "
              f"(tol {c.tolerance:g}) {'ok' if c.ok else 'FAIL'}")
    print("\n| B | H | N | D | precond fwd ms | flash fwd ms | fwd ratio | precond bwd ms | flash bwd ms | bwd ratio "
          "| precond fwd TFLOP/s | precond bwd TFLOP/s | precond peak MiB | flash peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    started = time.monotonic()
    for b, h, n, d in shapes:
        if time.monotonic() - started > args.budget:
            print(f"(stopped: time budget of {args.budget:.0f} s used)")
            break
        r = time_preconditioner(device, b, h, n, d)
        half = n * n / 2 * d * 2 * b * h  # one causal half-square matmul, in FLOPs
        print(f"| {b} | {h} | {n} | {d} | {r.precond_fwd_ms:.2f} | {r.flash_fwd_ms:.2f} | {r.fwd_ratio:.2f} "
              f"| {r.precond_bwd_ms:.2f} | {r.flash_bwd_ms:.2f} | {r.bwd_ratio:.2f} "
              f"| {2 * half / r.precond_fwd_ms / 1e9:.0f} | {5 * half / max(r.precond_bwd_ms, 1e-9) / 1e9:.0f} "
              f"| {r.precond_peak_mib:.0f} | {r.flash_peak_mib:.0f} |", flush=True)
    print("\ncorrectness: " + ("all ok" if kernels.status == Status.PASS else "FAILED"))
    return 0 if kernels.status == Status.PASS else 1


if __name__ == "__main__":
    sys.exit(main())
