"""Run a function on N real gloo ranks (spawned processes) and collect what each returns.

Each rank gets the torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK) on
a fresh free port, OMP_NUM_THREADS=1, and its process groups are torn down when the function
returns.  A rank that raises makes the whole call raise with its traceback; a hang is killed at
``timeout`` seconds.
"""

import io
import os
import queue
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        # Results travel as plain bytes: a tensor put on the queue as-is is shared through a file descriptor
        # that vanishes if this process exits before the parent has unpickled it (a race under load).
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report, never hang the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if "lucid_megatron.parallel.state" in sys.modules:  # Megatron's groups too
            sys.modules["lucid_megatron.parallel.state"].destroy_parallel()
        elif dist.is_initialized():  # a plain process group: no need to import Megatron (seconds per rank)
            dist.destroy_process_group()


def decode_result(value: bytes):
    return torch.load(io.BytesIO(value), weights_only=False)  # written by our own workers


def run_on_ranks(fn, world_size: int, *args, timeout: float = 300):
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            if status == "ok":
                out[rank] = decode_result(value)
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(out))}")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [out[r] for r in range(world_size)]
