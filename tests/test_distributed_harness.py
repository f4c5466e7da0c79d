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
