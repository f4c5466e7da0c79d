"""The LUCID GPT with context parallelism (2 ranks) equals CP=1: loss and every gradient, with RoPE (YaRN-scaled
over 16 tokens, so its frequency ramp and its attention factor on cos/sin cross the split as well), GQA, packed
documents whose lengths are not powers of two (padded per document for the zigzag split)."""

import pytest
from lucid_megatron.numerics import relative_error

from tests.distributed import run_on_ranks

from .cp_workers import cp_model_rank

DOCS = [37, 50, 13, 29]
# a softmax and a LUCID layer (tiny has 4 heads, 2 KV heads); documents beyond YaRN's original length
MIXED = dict(num_layers=2, lucid_layers=[2],
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})


@pytest.fixture(scope="module")
def cp1():
    return run_on_ranks(cp_model_rank, 1, "p2p", 1, MIXED, DOCS)[0]


def _compare(got, want):
    assert abs(got["loss"] - want["loss"]) / abs(want["loss"]) < 1e-6
    for name, g in want["grads"].items():
        err = relative_error(got["grads"][name], g)
        assert err < 5e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["a2a", "p2p"])
def test_cp2_model_equals_cp1(cp1, mode):
    _compare(run_on_ranks(cp_model_rank, 2, mode, 1, MIXED, DOCS)[0], cp1)


def test_p2p_with_fewer_kv_heads_than_ranks(cp1):
    """One KV head, CP=2: the sequence-pipelined mode does not need to split heads."""
    one_kv = dict(MIXED, num_kv_heads=1)
    want = run_on_ranks(cp_model_rank, 1, "p2p", 1, one_kv, DOCS)[0]
    _compare(run_on_ranks(cp_model_rank, 2, "p2p", 1, one_kv, DOCS)[0], want)


@pytest.mark.parametrize("mode", ["a2a", "p2p"])
def test_cp2_tp2_model_equals_cp1(cp1, mode):
    """4 processes: CP=2 x TP=2 with sequence parallelism (about 12 s each on 2 cores)."""
    _compare(run_on_ranks(cp_model_rank, 4, mode, 2, MIXED, DOCS, timeout=900)[0], cp1)


def test_cp4_a2a_p2p_as_2x2_model_equals_cp1(cp1):
    """4 processes: CP=4 as 2 a2a pairs x 2 pipeline stages (Megatron's hierarchical CP groups)."""
    _compare(run_on_ranks(cp_model_rank, 4, "a2a+p2p", 1, MIXED, DOCS, timeout=900)[0], cp1)


def test_cp4_a2a_p2p_as_2x2_with_tp2_model_equals_cp1(cp1):
    """8 processes: TP=2 (sequence parallel; 2 query heads and 1 KV head per TP rank, so the a2a pairs
    replicate it) x CP=4 as [2, 2] (about 45 s on 2 cores)."""
    _compare(run_on_ranks(cp_model_rank, 8, "a2a+p2p", 2, MIXED, DOCS, timeout=1200)[0], cp1)
