"""Row packing against a token-by-token re-implementation of the rules, and resumable states."""

import numpy as np
import pytest

from lucid_megatron.data import RowPacker

from .common import reference_rows

PAD = 999


def _random_docs(rng, count, seq_length):
    lengths = rng.integers(1, 3 * seq_length, size=count)
    lengths[:3] = (seq_length, seq_length + 1, 1)  # exact fit, one over, single token
    docs = [rng.integers(0, 256, size=n).astype(np.int32) for n in lengths]
    masks = [(rng.random(n) < 0.3).astype(np.uint8) for n in lengths]
    return docs, masks


def _pack(docs, masks, seq_length, mode, start=(0, 0)):
    first, offset = start
    source = (({"doc": i}, docs[i], masks[i]) for i in range(first, len(docs)))
    return list(RowPacker(seq_length, PAD, mode).pack(source, first_offset=offset))


@pytest.mark.parametrize("mode", ["all", "answer"])
@pytest.mark.parametrize("seq_length", [1, 7, 64])
def test_rows_match_the_token_by_token_reference(mode, seq_length):
    rng = np.random.default_rng(seq_length)
    docs, masks = _random_docs(rng, 60, seq_length)
    packed = _pack(docs, masks, seq_length, mode)
    expected = reference_rows(docs, masks, seq_length, mode, PAD)
    assert len(packed) == len(expected)
    for (row, _), (cells, segments) in zip(packed, expected):
        tokens, labels, weights, positions = (np.array(c) for c in zip(*cells))
        np.testing.assert_array_equal(row.tokens, tokens)
        np.testing.assert_array_equal(row.labels, labels)
        np.testing.assert_array_equal(row.loss_weight, weights)
        np.testing.assert_array_equal(row.position_ids, positions)
        np.testing.assert_array_equal(row.cu_seqlens, np.cumsum([0] + segments))
        assert row.tokens.dtype == row.labels.dtype == row.position_ids.dtype == row.cu_seqlens.dtype == np.int32
        assert row.loss_weight.dtype == np.float32
    if mode == "all" and seq_length > 1:
        total = sum(len(d) - 1 - (len(d) - 1) // seq_length for d in docs)  # one lost label per cut
        assert sum(row.loss_weight.sum() for row, _ in packed) == total


def test_small_example_by_hand():
    docs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9, 10, 11])]
    masks = [np.array([0, 1, 1]), np.array([0, 1]), np.array([0, 0, 1, 1, 0, 1])]
    rows = [row for row, _ in _pack(docs, masks, 4, "answer")]
    # Row 0: [1 2 3] + pad (doc 2 does not fit). Row 1: [4 5] + pad (doc 3 is longer than a row).
    # Row 2: [6 7 8 9] (a piece). Row 3: [10 11] + pad.
    assert [r.tokens.tolist() for r in rows] == [[1, 2, 3, PAD], [4, 5, PAD, PAD], [6, 7, 8, 9], [10, 11, PAD, PAD]]
    assert [r.labels.tolist() for r in rows] == [[2, 3, PAD, PAD], [5, PAD, PAD, PAD], [7, 8, 9, PAD],
                                                 [11, PAD, PAD, PAD]]
    assert [r.loss_weight.tolist() for r in rows] == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    assert [r.position_ids.tolist() for r in rows] == [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert [r.cu_seqlens.tolist() for r in rows] == [[0, 3, 4], [0, 2, 4], [0, 4], [0, 2, 4]]


@pytest.mark.parametrize("seq_length", [5, 32])
def test_resuming_from_any_row_state_gives_the_same_rows(seq_length):
    rng = np.random.default_rng(1)
    docs, masks = _random_docs(rng, 25, seq_length)
    full = _pack(docs, masks, seq_length, "answer")
    assert full[-1][1] is None  # ran out of documents
    for k, (_, state) in enumerate(full[:-1]):
        assert set(state) == {"doc", "offset"}
        rest = _pack(docs, masks, seq_length, "answer", start=(state["doc"], state["offset"]))
        assert len(rest) == len(full) - k - 1
        for (a, _), (b, _) in zip(rest, full[k + 1 :]):
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.loss_weight, b.loss_weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_tokens='some'"):
        RowPacker(8, PAD, "some")
    with pytest.raises(ValueError, match="seq_length=0"):
        RowPacker(0, PAD)
    with pytest.raises(ValueError, match="answer masks"):
        list(RowPacker(8, PAD, "answer").pack([({}, np.array([1, 2]), None)]))
    with pytest.raises(ValueError, match="resume offset 2"):
        list(RowPacker(8, PAD).pack([({}, np.array([1, 2]), None)], first_offset=2))
