"""TP=2 (2 gloo processes), with and without sequence parallelism, reproduces TP=1."""

import pytest
import torch

from lucid_megatron.numerics import relative_error

from tests.distributed import run_on_ranks

from .tp_workers import train_tiny

OVERRIDES = dict(num_layers=2, lucid_layers="every:2")  # a softmax and a LUCID layer, GQA 4:2


@pytest.fixture(scope="module")
def runs():
    return {
        "tp1": run_on_ranks(train_tiny, 1, False, OVERRIDES)[0],
        "tp2": run_on_ranks(train_tiny, 2, False, OVERRIDES)[0],
        "tp2-sp": run_on_ranks(train_tiny, 2, True, OVERRIDES)[0],
    }


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_initialisation_is_independent_of_tp(runs, layout):
    want, got = runs["tp1"]["initial"], runs[layout]["initial"]
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_logits_loss_and_gradients_match_tp1(runs, layout):
    want, got = runs["tp1"], runs[layout]
    assert relative_error(got["logits"], want["logits"]) < 1e-5
    assert (got["loss"] - want["loss"]).abs().max() < 1e-5
    assert got["grads"].keys() == want["grads"].keys()
    for name in want["grads"]:
        assert relative_error(got["grads"][name], want["grads"][name]) < 1e-4, name


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_sgd_loss_curve_matches_tp1(runs, layout):
    want, got = runs["tp1"]["losses"], runs[layout]["losses"]
    assert want[-1] < want[0] - 0.05  # the steps really train
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5


def test_sequence_parallel_matches_plain_tp(runs):
    for name, grad in runs["tp2"]["grads"].items():
        assert relative_error(runs["tp2-sp"]["grads"][name], grad) < 1e-4, name
