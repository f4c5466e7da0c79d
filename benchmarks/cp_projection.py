"""Analytic projection of context-parallel LUCID attention (one layer, forward + backward) to 64-256 GPUs:
a2a, p2p and a2a+p2p side by side, and which is fastest.

    python benchmarks/cp_projection.py [--gpus 64 128 256] [--seqlens 131072 262144 524288 1048576]
                                       [--heads 32 --kv-heads 4 --head-dim 64] [--tp 1] [--a2a-size A]

FLOPs, bytes and the time model are lucid_megatron/parallel/cp_cost.py (the bytes equal the counted
collectives exactly, tests/parallel/test_cp_bytes.py).  The compute rate is an assumed GPU rate (the
calibration line shows what the CPU measurement sustains on the same FLOP count); link bandwidths and
latencies are assumptions, printed with the table.  a2a+p2p uses an a2a group of GPUs per node / TP CP ranks
(one node) unless --a2a-size says otherwise.  Not a test, and not a measurement.
"""

from __future__ import annotations

import argparse

from lucid_megatron.parallel.cp_cost import Cluster, attention_flops, received_bytes, step_time

NOT_MODELLED = (
    "not modelled: overlap of communication with compute other than the p2p pipeline's (with the solve) and "
    "the key/value ring's (with the softmax part), congestion and topology beyond 'same node or not', "
    "collective algorithms (all-to-all = a message per peer; broadcasts and reduce-scatters bring data into "
    "a node once; a per-message latency; log2(group) steps per collective), kernel efficiency at small "
    "chunk sizes, memory, and the rest of the layer"
)


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--heads", type=int, default=32, help="query heads (the 1b preset: 32)")
    p.add_argument("--kv-heads", type=int, default=4, help="KV heads (the 1b preset: 4)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size: CP = GPUs / TP, heads / TP per rank")
    p.add_argument("--a2a-size", type=int, default=None, help="a2a+p2p group size (default GPUs per node / TP)")
    p.add_argument("--sub-chunks", type=int, default=1)
    p.add_argument("--gpu-tflops", type=float, default=400.0, help="assumed sustained attention TFLOP/s per GPU")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="per GPU and direction inside a node")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="per GPU across nodes (its own NIC)")
    p.add_argument("--cpu-seconds", type=float, default=9.25, help="measured CP=1 fwd+bwd time on the CPU")
    p.add_argument("--cpu-seqlen", type=int, default=16384)
    args = p.parse_args(argv)

    cluster = Cluster(rate=args.gpu_tflops * 1e12, ranks_per_node=args.gpus_per_node // args.tp,
                      nvlink=args.nvlink_gbs * 1e9, ib=args.ib_gbs * 1e9)
    hq, hkv, d, tp = args.heads // args.tp, args.kv_heads // args.tp, args.head_dim, args.tp
    a2a_size = args.a2a_size or cluster.ranks_per_node
    cpu_rate = attention_flops(args.cpu_seqlen, 64, 8, 2) / args.cpu_seconds
    print(f"calibration: the CPU CP=1 run (N={args.cpu_seqlen}, Hq=8, Hkv=2) sustains {cpu_rate / 1e9:.0f} GFLOP/s "
          f"on this FLOP count")
    print(f"assumptions: {args.gpu_tflops:.0f} TFLOP/s per GPU; nodes of {args.gpus_per_node} GPUs; "
          f"NVLink {args.nvlink_gbs:.0f} GB/s per GPU and direction, {cluster.nvlink_latency * 1e6:.0f} us per "
          f"message; across nodes InfiniBand {args.ib_gbs:.0f} GB/s per GPU (one NIC each), "
          f"{cluster.ib_latency * 1e6:.0f} us; bf16 tensors, fp32 preconditioner state; p2p sub_chunks="
          f"{args.sub_chunks}; TP={tp}")
    print(NOT_MODELLED)
    print(f"\nHq={hq}, Hkv={hkv} per TP rank, D={d}; one layer's attention, forward + backward, per GPU, ms; "
          "GB = received per GPU (a2a+p2p: over NVLink + over InfiniBand)\n")
    print("| N | GPUs | a2a total | p2p compute | p2p pipeline | p2p ring | p2p comm | p2p total | p2p GB | "
          "a2a+p2p AxP | compute | pipeline | ring | a2a comm | p2p comm | a2a+p2p total | a2a+p2p GB | fastest |")
    print("|" + "---|" * 18)
    for n in args.seqlens:
        for gpus in args.gpus:
            cp = gpus // tp
            totals = {}
            try:
                totals["a2a"] = step_time(n, d, hq, hkv, cp, cp, cluster, sub_chunks=args.sub_chunks)["total"]
                a2a_cell = _ms(totals["a2a"])
            except ValueError:
                a2a_cell = "n/a (heads)"
            pp = step_time(n, d, hq, hkv, cp, 1, cluster, sub_chunks=args.sub_chunks)
            totals["p2p"] = pp["total"]
            p_gb = sum(received_bytes(n, d, hq, hkv, cp, 1).values()) / 1e9
            cells = [str(n), str(gpus), a2a_cell, _ms(pp["compute"]), _ms(pp["pipeline"]), _ms(pp["ring"]),
                     _ms(pp["p2p_comm"]), _ms(pp["total"]), f"{p_gb:.2f}"]
            if 1 < a2a_size < cp and cp % a2a_size == 0:
                try:
                    hy = step_time(n, d, hq, hkv, cp, a2a_size, cluster, sub_chunks=args.sub_chunks)
                except ValueError:
                    cells += [f"{a2a_size}x{cp // a2a_size}: n/a (heads)"] + [""] * 7
                else:
                    totals["a2a+p2p"] = hy["total"]
                    sent = received_bytes(n, d, hq, hkv, cp, a2a_size)
                    a2a_gb = sent.pop("all_to_all") / 1e9
                    cells += [f"{a2a_size}x{cp // a2a_size}", _ms(hy["compute"]), _ms(hy["pipeline"]),
                              _ms(hy["ring"]), _ms(hy["a2a_comm"]), _ms(hy["p2p_comm"]), _ms(hy["total"]),
                              f"{a2a_gb:.2f} + {sum(sent.values()) / 1e9:.2f}"]
            else:
                cells += ["n/a"] + [""] * 7
            best = min(totals, key=totals.get)
            cells.append(best)
            print("| " + " | ".join(cells) + " |")
    single = attention_flops(args.seqlens[0], d, args.heads, args.kv_heads) / cluster.rate
    print(f"\n(one GPU would need {_ms(single)} ms for all heads at N={args.seqlens[0]})")


if __name__ == "__main__":
    main()
