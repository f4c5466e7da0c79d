"""Context-parallel LUCID attention on CPU: time, peak memory and bytes per rank, a2a vs p2p.

    python benchmarks/bench_context_parallel.py [--seqlens 8192 16384] [--cp 1 2 4] [--heads 8 --kv-heads 2]

Each configuration runs in fresh gloo processes (one thread each): local q/k/v shards of one packed
document in the zigzag layout, one warm-up forward+backward, then the median of ``--repeats``; peak memory is the rise of the resident
high-water mark (VmHWM, reset after the warm-up) over the resident memory before the timed runs.  Bytes are
the payload each rank receives, counted in lucid_megatron.parallel.context.  CP=1 is the plain operator.
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


def _rank(rank, world, port, mode, n, hq, hkv, d, repeats, sub_chunks, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lucid_megatron.ops import lucid_attention
    from lucid_megatron.parallel import context
    from lucid_megatron.parallel.cp_a2a import a2a_attention
    from lucid_megatron.parallel.cp_p2p import p2p_attention
    from lucid_megatron.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    dist.init_process_group("gloo", rank=rank, world_size=world)
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


def measure(world, mode, n, hq, hkv, d, repeats, sub_chunks):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, mode, n, hq, hkv, d, repeats, sub_chunks, results))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join()
    return max(r[1] for r in rows), max(r[2] for r in rows), max(r[3] for r in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sub-chunks", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from lucid_megatron.timing import cpu_name

    print(f"# {time.strftime('%Y-%m-%d')} | {cpu_name()} | {os.cpu_count()} cores | torch {torch.__version__} | "
          f"float32, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, one packed document, "
          f"1 thread per rank, p2p sub_chunks={args.sub_chunks}\n")
    print("| N | CP | mode | fwd+bwd s (slowest rank) | peak memory per rank MiB | received per rank MiB |")
    print("|---|---|---|---|---|---|")
    for n in args.seqlens:
        for cp in args.cp:
            for mode in (["-"] if cp == 1 else ["a2a", "p2p"]):
                t, mem, sent = measure(cp, mode, n, args.heads, args.kv_heads, args.head_dim, args.repeats,
                                       args.sub_chunks)
                print(f"| {n} | {cp} | {mode} | {t:.2f} | {mem / 2**20:.0f} | {sent / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
