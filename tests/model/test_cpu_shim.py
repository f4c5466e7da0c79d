"""The megatron-core CPU shim: active only without CUDA, and the redirected calls behave."""

import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from lucid_megatron.parallel.cpu_shim import apply_cpu_shim

from .common import single_process_parallel


def test_rng_tracker_streams_on_cpu():
    seed = 777
    with single_process_parallel(seed=seed):
        assert apply_cpu_shim() is True  # idempotent, and active on this CUDA-less machine
        expected_default = torch.Generator().manual_seed(seed)
        # Megatron's tensor-model-parallel stream is seeded with seed + 2718 + tp_rank.
        expected_tp = torch.Generator().manual_seed(seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
        with get_cuda_rng_tracker().fork():
            in_fork = torch.rand(5)
        after = torch.rand(5)
        with get_cuda_rng_tracker().fork():
            in_second_fork = torch.rand(5)
    assert torch.equal(in_fork, torch.rand(5, generator=expected_tp))
    assert torch.equal(in_second_fork, torch.rand(5, generator=expected_tp))  # the stream continues
    assert torch.equal(after, torch.rand(5, generator=expected_default))  # forks leave the default stream alone


def test_device_buffers_and_synchronize_on_cpu():
    with single_process_parallel():
        assert torch.cuda.current_device() == torch.device("cpu")
        buf = parallel_state.get_global_memory_buffer().get_tensor((4, 3), torch.float32, "test")
        assert buf.device.type == "cpu" and buf.shape == (4, 3)
        assert torch.cuda.synchronize() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim patches nothing where CUDA is available")
def test_deepspeed_skips_its_shared_memory_op_on_cpu():
    """Patch 5: DeepSpeed must not compile deepspeed_shm_comm (training never uses it) when an engine starts."""
    assert apply_cpu_shim(deepspeed=True) is True
    import deepspeed.ops

    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


def test_shim_is_not_applied_when_cuda_is_available():
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "original = torch.cuda.current_device\n"
        "from lucid_megatron.parallel.cpu_shim import apply_cpu_shim, cpu_shim_active\n"
        "assert apply_cpu_shim() is False and not cpu_shim_active()\n"
        "import sys\n"
        "assert apply_cpu_shim(deepspeed=True) is False and 'deepspeed' not in sys.modules\n"
        "assert torch.cuda.current_device is original\n"
        "import megatron.core.tensor_parallel.random as r\n"
        "assert r._get_cuda_rng_state.__module__ == 'megatron.core.tensor_parallel.random'\n"
        "print('untouched')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "untouched" in out.stdout, out.stderr


@pytest.mark.parametrize("size", [2, 4])
def test_rope_table_split_for_context_parallelism_on_cpu(size):
    """Patch 6: each CP rank gets chunks rank and 2*size-1-rank of the table (the zigzag split), in that order."""
    from megatron.core.models.common.embeddings import rope_utils, yarn_rotary_pos_embedding

    apply_cpu_shim()
    table = torch.arange(8 * size * 3, dtype=torch.float32).reshape(8 * size, 1, 1, 3)

    class Group:  # what the function asks of a process group: its size and this rank
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return size

        def rank(self):
            return self._rank

    chunk = 4  # 8 * size rows in 2 * size chunks
    for rank in range(size):
        got = rope_utils.get_pos_emb_on_this_cp_rank(table, 0, Group(rank))
        mirror = 2 * size - 1 - rank
        want = torch.cat([table[rank * chunk : (rank + 1) * chunk], table[mirror * chunk : (mirror + 1) * chunk]])
        assert torch.equal(got, want)
    assert yarn_rotary_pos_embedding.get_pos_emb_on_this_cp_rank is rope_utils.get_pos_emb_on_this_cp_rank
