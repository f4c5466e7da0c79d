"""Checkpoint saves on CPU: how long training is blocked, synchronous vs background writes, side by side.

    python benchmarks/bench_checkpoint.py [--presets 125m 350m] [--seq-length 128] [--dir DIR]
                                          [--precision fp32|bf16] [--sizes-only]

Each preset runs in two fresh gloo processes (DP=2, ZeRO-1, fp32, one thread each) on random tokens:
two warm-up steps, then the median step time with no save in flight; one synchronous save (the time the
call blocks, which is the whole write); one background save (the time the call blocks, then training goes on:
the step times while the forked writers run, until the checkpoint is published, and how long that took);
and a plain sequential write of the same number of bytes by each rank to the same directory (64 MiB
``write`` calls, then ``fsync``), the disk's limit.  It also prints each component's bytes per parameter
(``--sizes-only``: only that, from one synchronous save; ``--precision bf16``: bf16 weights, fp32 master).
Goal: a background save blocks training for at most 10% of a synchronous one.  Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_context_parallel import _free_port  # noqa: E402  (the benchmarks' port helper)


def _micro_batch(runtime, vocab: int, seq: int, step: int):
    from lucid_megatron.data.loader import MicroBatch

    g = torch.Generator().manual_seed(1000 * step + torch.distributed.get_rank())
    tokens = torch.randint(0, vocab, (1, seq + 1), generator=g)
    batch = MicroBatch(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_weight=torch.ones(1, seq),
                       position_ids=torch.arange(seq).unsqueeze(0), cu_seqlens=torch.tensor([0, seq], dtype=torch.int32),
                       max_seqlen=seq, num_rows=1, stream_states={})
    return runtime.micro_batch(batch)


def _tree_bytes(path: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for file in path.rglob("*"):
        if file.is_file():
            part = file.relative_to(path).parts[0] if len(file.relative_to(path).parts) > 1 else "files"
            sizes[part] = sizes.get(part, 0) + file.stat().st_size
    return sizes


def _rank(rank, world, port, preset, seq, root, precision, sizes_only, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lucid_megatron.checkpoint import Checkpointer, RngStreams
    from lucid_megatron.config import load_model_config
    from lucid_megatron.runtime import start_runtime, stop_runtime
    from lucid_megatron.runtime.parallelize import EngineOptions, build_engine, build_model
    from lucid_megatron.train.engine import train_step

    runtime = start_runtime()
    model_cfg = load_model_config(preset, {"max_seq_len": max(seq, 2048)})
    engine = build_engine(build_model(runtime, model_cfg, precision=precision),
                          EngineOptions(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, micro_batch_size=1,
                                        grad_accum=1, zero_stage=1, grad_clip=1.0, bf16=precision == "bf16"))
    params = sum(p.numel() for p in engine.module.parameters())
    step = 0

    def one_step() -> float:
        nonlocal step
        step += 1
        start = time.perf_counter()
        train_step(engine, runtime, [_micro_batch(runtime, model_cfg.vocab_size, seq, step)], 1e-4)
        return time.perf_counter() - start

    for _ in range(2):
        one_step()
    idle = [one_step() for _ in range(3)]
    out = {"params": params, "idle_step": statistics.median(idle)}

    sync = Checkpointer(Path(root) / "sync", keep_last=1, async_save=False)
    dist.barrier()
    start = time.perf_counter()
    path = sync.save(step, engine, {}, RngStreams())
    out["sync_blocked"] = time.perf_counter() - start
    if rank == 0:
        out["sizes"] = _tree_bytes(path)
    if sizes_only:
        engine.destroy()
        stop_runtime()
        results.put((rank, out))
        return

    background = Checkpointer(Path(root) / "async", keep_last=1, async_save=True)
    dist.barrier()
    start = time.perf_counter()
    background.save(step, engine, {}, RngStreams())
    out["async_blocked"] = time.perf_counter() - start
    during = []
    while background.pending is not None:
        during.append(one_step())
        background.poll()
    out["async_written_after"] = time.perf_counter() - start
    out["steps_during"] = during

    # The disk's limit: the same bytes, written plainly by each rank at once.
    total = sum(_tree_bytes(path).values()) if rank == 0 else 0
    total = int(runtime.host(runtime.all_reduce(runtime.tensor([total])))[0])
    chunk = bytes(64 << 20)
    share, plain = total // world, Path(root) / f"plain_{rank}.bin"
    dist.barrier()
    start = time.perf_counter()
    with open(plain, "wb") as f:
        left = share
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()
    out["plain_seconds"] = time.perf_counter() - start
    out["bytes"] = total
    plain.unlink()
    engine.destroy()
    stop_runtime()
    results.put((rank, out))


def measure(preset: str, seq: int, root: Path, precision: str, sizes_only: bool) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, preset, seq, str(root), precision, sizes_only, results)) for r in range(2)]
    for p in procs:
        p.start()
    found = dict(results.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join()
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["125m", "350m"])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary directory)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--sizes-only", action="store_true", help="only the bytes per parameter of each component")
    args = parser.parse_args(argv)
    from lucid_megatron.timing import cpu_name

    print(f"# bench_checkpoint {datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs: DP=2 ZeRO-1 "
          f"{args.precision} on gloo, "
          f"{args.seq_length} tokens per step per rank\n")
    rows, sizes = [], []
    for preset in args.presets:
        root = Path(tempfile.mkdtemp(prefix=f"ckpt-{preset}-", dir=args.dir))
        try:
            ranks = measure(preset, args.seq_length, root, args.precision, args.sizes_only)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        r0, r1 = ranks[0], ranks[1]
        per_param = {part: size / r0["params"] for part, size in sorted(r0["sizes"].items())}
        sizes.append(f"| {preset} | {args.precision} | " + ", ".join(f"{part} {b:.2f}" for part, b in per_param.items())
                     + f" | {sum(per_param.values()):.2f} |")
        if args.sizes_only:
            continue
        blocked_sync = max(r0["sync_blocked"], r1["sync_blocked"])
        blocked_async = max(r0["async_blocked"], r1["async_blocked"])
        during = r0["steps_during"] or [float("nan")]
        gb = r0["bytes"] / 1e9
        rows.append(f"| {preset} | {r0['params'] / 1e6:.1f}M | {gb:.2f} GB | {blocked_sync:.2f} | {blocked_async:.2f} | "
                    f"{blocked_async / blocked_sync:.1%} | {r0['async_written_after']:.2f} | {r0['idle_step']:.2f} | "
                    f"{statistics.median(during):.2f} ({len(r0['steps_during'])}) | {gb / blocked_sync:.2f} | "
                    f"{gb / r0['plain_seconds']:.2f} |")
    if rows:
        print("| preset | parameters | checkpoint | sync save blocks, s | async save blocks, s | async / sync | "
              "async written and published after, s | step, s (idle) | step, s, during the background write (steps) "
              "| sync write GB/s | plain sequential write GB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n")
    print("| preset | precision | bytes per parameter by component | total |\n|---|---|---|---|")
    print("\n".join(sizes))


if __name__ == "__main__":
    main()
