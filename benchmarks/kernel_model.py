"""Analytic cost model of the Triton LUCID kernels against causal flash attention on one H200 (docs/kernels.md).

    python benchmarks/kernel_model.py            # the markdown table in docs/kernels.md

Not a measurement.  Per KV head (G = B x Hkv heads in all), sequence N, head dim D = Dv, row blocks of BM:

* FLOPs.  Forward: per block pair (i > j) one kernel tile (2 BM^2 D) and one product with V'_j (2 BM^2 D), so
  2 N^2 D per head; the diagonal pre-pass adds 2 log2(BM) products of BM^3 per block (TF32) and the apply one.
  Backward: the dV solve 2 products per pair, the key-gradient kernel 3 per pair on each side: 8 N^2 D per head.
  Flash (causal, MHA, per query head): forward 2 N^2 D, backward 5 N^2 D (with its recomputation).
* Throughput bound: FLOPs / (peak x efficiency).  Both sides are assumed to reach the same fraction of peak on
  16-bit products (ours: 64-row wgmma tiles loading 4 BM D bytes per 4 BM^2 D FLOPs, 64 FLOP/byte from L2,
  like flash's tiles), TF32 at half rate.
* Critical path: the solve is a chain of N / BM links per head; a link is one block-pair product on one SM,
  one diagonal apply, a store and a flag hand-over through L2 (``LINK_LATENCY_US``).  The key-gradient kernel
  has no chain; its longest program does N / BM pairs of 3 products.
* Time = max(throughput bound, critical path) per kernel, summed over the kernels of a pass.
"""

from __future__ import annotations

import math

PEAK_BF16 = 989e12  # H200 SXM dense bf16 FLOP/s (same tensor cores as H100 SXM)
PEAK_TF32 = PEAK_BF16 / 2
SMS = 132
EFFICIENCY = 0.5  # fraction of peak reached by 64-row tiles, ours and flash's alike (assumption)
LINK_LATENCY_US = 1.5  # flag release -> acquire on another SM, plus the barrier and the stores (assumption)
BM = 64


def per_sm(rate: float) -> float:
    return rate * EFFICIENCY / SMS


def lucid_times(n: int, d: int, heads: int) -> tuple[float, float]:
    """(forward, backward) seconds of the preconditioner for ``heads`` = B x Hkv heads."""
    blocks = n / BM
    pair = 2 * (2 * BM * BM * d) / per_sm(PEAK_BF16)  # kernel tile + one product, on one SM
    diagonal_apply = 2 * BM * BM * d / per_sm(PEAK_TF32)
    inverse_flops = heads * blocks * (2 * math.log2(BM) * 2 * BM**3 + 2 * BM * BM * d)
    inverse = inverse_flops / (PEAK_TF32 * EFFICIENCY)
    chain = blocks * (pair + diagonal_apply + LINK_LATENCY_US * 1e-6)
    forward = inverse + max(heads * 2 * n * n * d / (PEAK_BF16 * EFFICIENCY), chain)
    solve_bwd = max(heads * 2 * n * n * d / (PEAK_BF16 * EFFICIENCY), chain)
    keys = max(heads * 6 * n * n * d / (PEAK_BF16 * EFFICIENCY), blocks * 1.5 * pair)
    return forward, inverse + solve_bwd + keys


def flash_times(n: int, d: int, heads: int) -> tuple[float, float]:
    rate = PEAK_BF16 * EFFICIENCY
    return heads * 2 * n * n * d / rate, heads * 5 * n * n * d / rate


def main() -> None:
    print("| N | D | B x Hkv | LUCID fwd ms | flash fwd ms | fwd ratio | LUCID bwd ms | flash bwd ms | bwd ratio | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in (8192, 16384, 32768, 65536):
        for d in (64, 128):
            for heads in (2, 8, 64):
                lf, lb = lucid_times(n, d, heads)
                ff, fb = flash_times(n, d, heads)
                blocks = n / BM
                pair = 2 * (2 * BM * BM * d) / per_sm(PEAK_BF16)
                chain = blocks * (pair + 2 * BM * BM * d / per_sm(PEAK_TF32) + LINK_LATENCY_US * 1e-6)
                bound = "chain" if chain > heads * 2 * n * n * d / (PEAK_BF16 * EFFICIENCY) else "FLOPs"
                print(f"| {n // 1024}K | {d} | {heads} | {1e3 * lf:.2f} | {1e3 * ff:.2f} | {lf / ff:.2f} "
                      f"| {1e3 * lb:.2f} | {1e3 * fb:.2f} | {lb / fb:.2f} | {bound} |")


if __name__ == "__main__":
    main()
