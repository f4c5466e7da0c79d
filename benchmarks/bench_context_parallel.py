"""Context-parallel LUCID attention on CPU: time, peak memory and bytes per rank, a2a vs p2p vs a2a+p2p.

    python benchmarks/bench_context_parallel.py [--seqlens 8192] [--cp 1 2 4] [--heads 8 --kv-heads 2]
                                                [--a2a-size 2]

Each configuration runs in fresh gloo processes (one thread each): local q/k/v shards of one packed
document in the zigzag layout, one warm-up forward+backward, then the median of ``--repeats``; peak memory is the rise of the resident
high-water mark (VmHWM, reset after the warm-up) over the resident memory before the timed runs.  Bytes are
the payload each rank receives, counted in lucid_megatron.parallel.context, next to the formula of
lucid_megatron.parallel.cp_cost.  CP=1 is the plain operator.  a2a+p2p runs where ``--a2a-size`` lies
strictly between 1 and CP, with Megatron's hierarchical groups (consecutive ranks exchange heads, strided
ranks run the pipeline).
With more processes than cores the times are oversubscribed; memory and bytes are exact.  Not a test.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hierarchical_groups(world, a2a_size):
    """This rank's (a2a group, p2p group); every rank creates every group, in the same order."""
    import torch.distributed as dist

    rank, mine = dist.get_rank(), {}
    for name, groups in (("a2a", [range(s, s + a2a_size) for s in range(0, world, a2a_size)]),
                         ("p2p", [range(o, world, a2a_size) for o in range(a2a_size)])):
        for ranks in groups:
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine[name] = group
    return mine["a2a"], mine["p2p"]


def _rank(rank, world, port, mode, n, hq, hkv, d, repeats, sub_chunks, a2a_size, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lucid_megatron.ops import lucid_attention
    from lucid_megatron.parallel import context
    from lucid_megatron.parallel.cp_a2a import a2a_attention
    from lucid_megatron.parallel.cp_hybrid import hybrid_attention
    from lucid_megatron.parallel.cp_p2p import p2p_attention
    from lucid_megatron.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    dist.init_process_group("gloo", rank=rank, world_size=world)
    if mode == "a2a+p2p":
        a2a_group, p2p_group = _hierarchical_groups(world, a2a_size)
    layout = context.ZigzagLayout((n,), world, rank)
    local = n // world
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, local, h, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    grad = torch.randn(1, local, hq, d, generator=g)

    def step():
        if world == 1:
            out = lucid_attention(q, k, v)
        elif mode == "a2a":
            out = a2a_attention(q, k, v, layout, dist.group.WORLD, lucid=True, eps=1e-6, scale=d**-0.5)
        elif mode == "a2a+p2p":
            out = hybrid_attention(q, k, v, layout, a2a_group, p2p_group, lucid=True, eps=1e-6, scale=d**-0.5,
                                   sub_chunks=sub_chunks)
        else:
            out = p2p_attention(q, k, v, layout, dist.group.WORLD, lucid=True, eps=1e-6, scale=d**-0.5,
                                sub_chunks=sub_chunks)
        out.backward(grad)

    step()  # warm-up
    reset_peak_rss()
    baseline = current_rss_bytes()
    context.reset_comm_bytes()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    sent = sum(context.comm_bytes.values()) / repeats
    results.put((rank, statistics.median(times), peak - baseline, sent))
    dist.destroy_process_group()


def measure(world, mode, n, hq, hkv, d, repeats, sub_chunks, a2a_size):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank,
                         args=(r, world, port, mode, n, hq, hkv, d, repeats, sub_chunks, a2a_size, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join()
    return max(r[1] for r in rows), max(r[2] for r in rows), max(r[3] for r in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 6 configurations of 4 processes or fewer; 16384 as well takes over 7 min on 2 busy cores
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sub-chunks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--a2a-size", type=int, default=2, help="a2a+p2p: ranks of one head all-to-all")
    args = parser.parse_args(argv)
    from lucid_megatron.parallel.cp_cost import received_bytes
    from lucid_megatron.timing import cpu_name

    print(f"# {time.strftime('%Y-%m-%d')} | {cpu_name()} | {os.cpu_count()} cores | torch {torch.__version__} | "
          f"float32, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, one packed document, "
          f"1 thread per rank, p2p sub_chunks={args.sub_chunks}, a2a+p2p as [{args.a2a_size}, CP / {args.a2a_size}]\n")
    print("| N | CP | mode | fwd+bwd s (slowest rank) | peak memory per rank MiB | received per rank MiB | "
          "cp_cost formula MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.seqlens:
        for cp in args.cp:
            modes = ["-"] if cp == 1 else ["a2a", "p2p"]
            if 1 < args.a2a_size < cp and cp % args.a2a_size == 0:
                modes.append("a2a+p2p")
            for mode in modes:
                t, mem, sent = measure(cp, mode, n, args.heads, args.kv_heads, args.head_dim, args.repeats,
                                       args.sub_chunks, args.a2a_size)
                a2a_size = {"-": 1, "a2a": cp, "p2p": 1, "a2a+p2p": args.a2a_size}[mode]
                formula = sum(received_bytes(n, args.head_dim, args.heads, args.kv_heads, cp, a2a_size,
                                             elem=4, acc=4).values())  # float32
                print(f"| {n} | {cp} | {mode} | {t:.2f} | {mem / 2**20:.0f} | {sent / 2**20:.1f} | "
                      f"{formula / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
