"""The bytes each CP rank receives in one LUCID forward+backward equal lucid_megatron.parallel.cp_cost's
formulas exactly, per collective kind, for a2a, p2p and a2a+p2p (4 real gloo ranks, one spawn for all)."""

import pytest
import torch

from lucid_megatron.parallel.cp_cost import received_bytes
from tests.distributed import run_on_ranks

from .cp_bytes_workers import cp_bytes_rank

DOCS = [40, 24, 56]  # a packed row; multiples of 2 x 4 for the zigzag split at CP = 4
HQ, HKV, D = 4, 2, 8  # GQA; at CP = 4 the a2a mode replicates the 2 KV heads to 4
DTYPE, ELEM, ACC = torch.bfloat16, 2, 4  # model dtype and the preconditioner's float32 differ in size
HYBRID_A2A = 2  # a2a+p2p at CP = 4 as [2, 2]; CP = 2 runs on those pairs
CASES = [("a2a", 2), ("p2p", 2), ("a2a", 4), ("p2p", 4), ("a2a+p2p", 4)]


@pytest.fixture(scope="module")
def counted():
    return run_on_ranks(cp_bytes_rank, 4, CASES, DOCS, HQ, HKV, D, DTYPE, HYBRID_A2A)


@pytest.mark.parametrize("mode,cp", CASES, ids=[f"{m}-cp{c}" for m, c in CASES])
def test_received_bytes_equal_the_cost_model(counted, mode, cp):
    a2a_size = {"a2a": cp, "p2p": 1, "a2a+p2p": HYBRID_A2A}[mode]
    want = received_bytes(sum(DOCS), D, HQ, HKV, cp, a2a_size, ELEM, ACC)
    for rank, by_case in enumerate(counted):
        assert by_case[mode, cp] == want, f"rank {rank}: counted {by_case[mode, cp]}, formula {want}"
