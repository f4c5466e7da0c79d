"""The multi-process test harness must not depend on timing (a flaky CI blocks landing)."""

import torch
import torch.multiprocessing as mp

from tests.distributed import _worker, decode_result, free_port


def _tensors(rank, world_size):
    return {"rank": rank, "values": torch.arange(1000, dtype=torch.float64) * (rank + 1)}


def test_a_result_is_readable_after_its_worker_exited():
    """Under load the worker can exit before the parent reads its result: that must still work."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_worker, args=(_tensors, 0, 1, free_port(), (), results))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 0
    rank, status, value = results.get(timeout=60)  # the worker is gone by now
    assert (rank, status) == (0, "ok"), value
    result = decode_result(value)
    assert torch.equal(result["values"], torch.arange(1000, dtype=torch.float64))


def test_ports_are_disjoint_between_workers_and_outside_the_ephemeral_range(monkeypatch):
    """Two xdist workers, or gloo's own outgoing connections, must never take a rank-0 port (EADDRINUSE)."""
    import socket
    from pathlib import Path

    import tests.distributed as harness

    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    drawn = {}
    for worker in ("gw0", "gw1", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        drawn[worker] = {harness.free_port() for _ in range(20)}
        assert len(drawn[worker]) == 20  # successive draws differ
    assert not drawn["gw0"] & drawn["gw1"] and not drawn["gw1"] & drawn["gw3"] and not drawn["gw0"] & drawn["gw3"]
    assert max(max(ports) for ports in drawn.values()) < ephemeral_low

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    busy_port = harness._PORT_BASE + harness._next_port_offset  # the next candidate, held by a listener
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", busy_port))
        listener.listen()
        assert harness.free_port() != busy_port
