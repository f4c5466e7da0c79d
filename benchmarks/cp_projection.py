"""Analytic model of context-parallel LUCID attention per layer (forward + backward), for 8-64 GPUs.

    python benchmarks/cp_projection.py [--seqlen 131072] [--heads 32 --kv-heads 4 --head-dim 64]
                                       [--cpu-seconds 10.81 --cpu-seqlen 16384 --cpu-heads 8 --cpu-kv-heads 2]

The formulas (docs/context-parallel.md) count FLOPs and the bytes each rank receives; the byte formulas
match the counters of benchmarks/bench_context_parallel.py exactly.  The compute rate is calibrated from
a measured single-process run (default: this repository's CPU measurement) and then replaced by an
assumed GPU rate; network numbers are assumptions, printed with the table.  Not a test.
"""

from __future__ import annotations

import argparse
import math


def attention_flops(n: int, d: int, hq: int, hkv: int) -> float:
    """Forward + backward FLOPs of causal LUCID attention: 7 N^2 D per query head (softmax part, 2 forward
    + 5 backward half-square matmuls) and per KV head (preconditioner)."""
    return 7.0 * n * n * d * (hq + hkv)


def a2a_bytes(n, d, hq, hkv, cp, elem=2):
    """Received per rank: all-to-all of q, k, v, o forward and their gradients backward."""
    hkv_eff = max(hkv, cp)  # KV heads are replicated when there are fewer than ranks
    return 2 * (cp - 1) / cp**2 * n * (2 * hq + 2 * hkv_eff) * d * elem


def p2p_bytes(n, d, hkv, cp, elem=2, acc=4):
    """Received per rank: forward all-gather of Kn (acc dtype) and K, the V' broadcasts; backward the
    re-gathers (K, Kn, V'), reduce-scatters of dK and dV', the dV broadcasts and the Kn row-side terms."""
    return (cp - 1) / cp * n * hkv * d * (8 * acc + 2 * elem)


def a2a_time(n, d, hq, hkv, cp, rate, bandwidth, latency):
    hkv_eff = max(hkv, cp)
    compute = attention_flops(n, d, hq, hkv_eff) / cp / rate
    comm = a2a_bytes(n, d, hq, hkv, cp) / bandwidth + 8 * (cp - 1) * latency
    return compute, comm


def p2p_time(n, d, hq, hkv, cp, rate, bandwidth, latency, sub_chunks):
    units = 2 * cp * sub_chunks
    m = n / units
    compute = attention_flops(n, d, hq, hkv) / cp / rate
    # Pipeline: each unit waits for its predecessor's broadcast and then does one cross-unit update and
    # its own diagonal solve (forward: 2 + 1 half-square matmuls of m rows; backward: about 2.5x).
    per_unit = 3.5 * (2 * m * m * d * hkv) / rate + latency + m * hkv * d * 4 / bandwidth
    bubble = units * per_unit
    # 2 broadcasts per unit (V' forward, dV backward) and 10 gathers/reduce-scatters, each a log2(cp)-step tree
    comm = p2p_bytes(n, d, hkv, cp) / bandwidth + (2 * units + 10) * math.log2(cp) * latency
    return compute, comm, bubble


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--sub-chunks", type=int, default=1)
    p.add_argument("--cpu-seconds", type=float, default=9.25, help="measured CP=1 fwd+bwd time")
    p.add_argument("--cpu-seqlen", type=int, default=16384)
    p.add_argument("--cpu-heads", type=int, default=8)
    p.add_argument("--cpu-kv-heads", type=int, default=2)
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed sustained bf16 attention TFLOP/s")
    p.add_argument("--nvlink-gbs", type=float, default=300.0, help="assumed per-GPU bandwidth inside a node")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="assumed per-GPU bandwidth across nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    args = p.parse_args(argv)

    cpu_rate = attention_flops(args.cpu_seqlen, 64, args.cpu_heads, args.cpu_kv_heads) / args.cpu_seconds
    print(f"calibration: CPU CP=1 run sustains {cpu_rate / 1e9:.1f} GFLOP/s on the LUCID attention FLOP count")
    print(f"assumptions: {args.gpu_tflops:.0f} TFLOP/s per GPU; {args.nvlink_gbs:.0f} GB/s and 10 us inside a node "
          f"of {args.gpus_per_node}; {args.ib_gbs:.0f} GB/s and 25 us across nodes; no overlap counted; "
          f"p2p sub_chunks={args.sub_chunks}; bf16 tensors, fp32 preconditioner state\n")
    n, d, hq, hkv = args.seqlen, args.head_dim, args.heads, args.kv_heads
    rate = args.gpu_tflops * 1e12
    print(f"N = {n}, Hq = {hq}, Hkv = {hkv}, D = {d}; one layer, forward + backward, per GPU (ms)\n")
    print("| GPUs (CP) | compute | a2a comm | a2a total | p2p comm | p2p pipeline bubble | p2p total |")
    print("|---|---|---|---|---|---|---|")
    single = attention_flops(n, d, hq, hkv) / rate
    for cp in (8, 16, 32, 64):
        inside = cp <= args.gpus_per_node
        bw = (args.nvlink_gbs if inside else args.ib_gbs) * 1e9
        lat = 10e-6 if inside else 25e-6
        compute, p_comm, bubble = p2p_time(n, d, hq, hkv, cp, rate, bw, lat, args.sub_chunks)
        if hq % cp == 0 and (hkv % cp == 0 or cp % hkv == 0):
            a_compute, a_comm = a2a_time(n, d, hq, hkv, cp, rate, bw, lat)
            a2a_cells = f"{1e3 * a_comm:.2f} | {1e3 * (a_compute + a_comm):.2f}"
        else:
            a2a_cells = "n/a (heads) | n/a"
        p2p_total = max(compute, bubble) + p_comm
        print(f"| {cp} | {1e3 * compute:.2f} | {a2a_cells} | {1e3 * p_comm:.2f} | {1e3 * bubble:.2f} | "
              f"{1e3 * p2p_total:.2f} |")
    print(f"\n(one GPU would need {1e3 * single:.1f} ms for this layer's attention)")


if __name__ == "__main__":
    main()
