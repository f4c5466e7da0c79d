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


# Ports are drawn below the kernel's ephemeral range: a port taken with bind(0) and released comes from that
# range, and every outgoing connection (gloo opens many) draws from it too, so one could take the port before
# rank 0 listens on it (EADDRINUSE).  Each pytest-xdist worker draws from its own slice, so two workers never
# pick the same port; within a process the draws go round the slice.
_PORT_BASE, _PORTS_PER_WORKER = 12000, 2000
_next_port_offset = os.getpid() % _PORTS_PER_WORKER


def _worker_index() -> int:
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3"; absent when xdist is not used
    return int(name[2:]) if name[2:].isdigit() else 0


def free_port() -> int:
    """A port that is free now and that no other test process on this machine will pick."""
    global _next_port_offset
    first = _PORT_BASE + _worker_index() * _PORTS_PER_WORKER
    for _ in range(_PORTS_PER_WORKER):
        port = first + _next_port_offset
        _next_port_offset = (_next_port_offset + 1) % _PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {first}..{first + _PORTS_PER_WORKER - 1}")


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
    """``fn(rank, world_size, *args)`` on ``world_size`` processes; returns the results by rank.

    If rank 0 could not listen on its port (a process outside the tests took it), the call is tried once more
    on another port; every other failure raises at once."""
    try:
        return _run_once(fn, world_size, args, timeout)
    except AssertionError as error:
        if "EADDRINUSE" not in str(error):
            raise
        return _run_once(fn, world_size, args, timeout)


def _run_once(fn, world_size, args, timeout):
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
