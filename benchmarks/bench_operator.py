"""Side-by-side CPU timing of blockwise LUCID, causal SDPA and the dense LUCID reference.

    python benchmarks/bench_operator.py [--seqlens 1024 4096 8192] [--repeats 3]

Prints a markdown table (times in ms, ratios to SDPA measured in the same run) ready for
docs/performance.md.  Not a test: timings never decide pass/fail.
"""

from __future__ import annotations

import argparse
import datetime

import psutil
import torch
import torch.nn.functional as F

from lucid_megatron.ops import lucid_attention
from lucid_megatron.timing import cpu_name, median_seconds


def _sdpa(q, k, v):
    gqa = q.shape[2] != k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa
    )
    return out.transpose(1, 2)


def _lucid(backend):
    return lambda q, k, v: lucid_attention(q, k, v, backend=backend)


def _time(fn, inputs, grad_out, backward: bool, repeats: int) -> float:
    """Median wall time in seconds of fn (and its backward) over `repeats` runs after a warm-up."""

    def once():
        out = fn(*inputs)
        if backward:
            out.backward(grad_out)
            for x in inputs:
                x.grad = None

    return median_seconds(once, repeats)


def _dense_reference_bytes(n: int, hq: int, hkv: int) -> int:
    # Autograd keeps several [heads, N, N] float32 matrices alive (kernel, scores, probabilities):
    # measured 2.7 GiB at N=4096, Hq=Hkv=8, i.e. about 2.6 matrices per head; 3 leaves a margin.
    return 4 * n * n * 3 * (hkv + hq)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    print(
        f"# {datetime.date.today()} | {cpu_name()} | {torch.get_num_threads()} threads | "
        f"torch {torch.__version__} | float32, batch 1, Hq={args.heads}, D={args.head_dim}\n"
    )
    print(
        "| N | Hkv | SDPA fwd ms | SDPA fwd+bwd ms | LUCID fwd ms (x SDPA) | LUCID fwd+bwd ms (x SDPA) "
        "| dense ref fwd ms (x SDPA) | dense ref fwd+bwd ms (x SDPA) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.seqlens:
        for hkv in args.kv_heads:
            d, hq = args.head_dim, args.heads
            inputs = [
                torch.randn(1, n, h, d, requires_grad=True) for h in (hq, hkv, hkv)
            ]
            grad_out = torch.randn(1, n, hq, d)
            row = {}
            for name, fn in (("sdpa", _sdpa), ("lucid", _lucid("blockwise")), ("ref", _lucid("reference"))):
                if name == "ref" and _dense_reference_bytes(n, hq, hkv) > 0.8 * psutil.virtual_memory().available:
                    row[name] = (float("nan"), float("nan"))
                    continue
                repeats = 1 if name == "ref" else args.repeats
                row[name] = (
                    _time(fn, inputs, grad_out, False, repeats),
                    _time(fn, inputs, grad_out, True, repeats),
                )
            sf, sb = row["sdpa"]

            def cell(name, i):
                t = row[name][i]
                if t != t:  # NaN: skipped
                    return "skipped (memory)"
                return f"{1e3 * t:.0f} ({t / (sf, sb)[i]:.2f}x)"

            print(
                f"| {n} | {hkv} | {1e3 * sf:.0f} | {1e3 * sb:.0f} | {cell('lucid', 0)} | {cell('lucid', 1)} "
                f"| {cell('ref', 0)} | {cell('ref', 1)} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
