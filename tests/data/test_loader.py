"""Streams, DP ranks, loader workers and resume, checked against an independent reference order.

The reference re-derives the documented order from scratch: shard i belongs to stream i % S; a
stream reads its shards in ``default_rng([seed, epoch, stream]).permutation`` order, epoch after
epoch, and packs them with the token-by-token packer; global row r is row r // S of stream r % S.
"""

import itertools
import warnings

import numpy as np
import pytest
import torch

from lucid_megatron.config.schema import ConfigError
from lucid_megatron.data import (
    ShardError, check_stream_layout, iter_shard_documents, make_eval_loader, make_train_loader, read_manifest,
)

from .common import reference_rows, small_synth, write_documents

S, SEQ, GBS, MBS, SEED = 8, 64, 16, 2, 3
PAD = 258


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 12 shards of 4 documents: streams 0-3 get two shards, streams 4-7 one, so some streams wrap
    # into their next epoch within a few global batches while others do not.
    path = tmp_path_factory.mktemp("data") / "synth"
    small_synth(path, train_docs=48, valid_docs=20, docs_per_shard=4, seed=11)
    return path


def reference_global_rows(path, count, *, split="train", num_streams=S, seed=SEED, shuffle=True, one_pass=False,
                          mode="all"):
    """Global rows 0..count-1 as (cells, segments), or fewer if one pass runs out."""
    shards = read_manifest(path).shard_paths(split)
    streams = []
    for s in range(num_streams):
        mine, docs, masks, epoch = shards[s::num_streams], [], [], 0
        while True:
            order = np.random.default_rng([seed, epoch, s]).permutation(len(mine)) if shuffle else range(len(mine))
            for i in order:
                for tokens, mask in iter_shard_documents(mine[i]):
                    docs.append(tokens)
                    masks.append(mask)
            epoch += 1
            rows = reference_rows(docs, masks, SEQ, mode, PAD)
            if one_pass or len(rows) > count // num_streams + 1:  # the last row may still grow
                break
        streams.append(rows if one_pass else rows[:-1])
    total = [(r, streams[r % num_streams][r // num_streams]) for r in range(count)
             if r // num_streams < len(streams[r % num_streams])]
    return dict(total)


def split_rows(batch):
    """A MicroBatch as {global row index: (tokens, labels, weights, positions)} with internal checks."""
    t = batch.num_rows * SEQ
    assert batch.tokens.shape == batch.labels.shape == batch.loss_weight.shape == batch.position_ids.shape == (1, t)
    assert batch.tokens.dtype == batch.labels.dtype == batch.position_ids.dtype == torch.int64
    assert batch.loss_weight.dtype == torch.float32 and batch.cu_seqlens.dtype == torch.int32
    bounds = batch.cu_seqlens.tolist()
    assert bounds[0] == 0 and bounds[-1] == t and all(b in bounds for b in range(0, t + 1, SEQ))
    assert batch.max_seqlen == max(np.diff(bounds))
    expected_positions = np.concatenate([np.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_array_equal(batch.position_ids[0].numpy(), expected_positions)
    rows = {}
    for i, index in enumerate(batch.row_indices):
        part = slice(i * SEQ, (i + 1) * SEQ)
        rows[index] = tuple(x[0, part].numpy() for x in (batch.tokens, batch.labels, batch.loss_weight,
                                                          batch.position_ids))
    return rows


def assert_row_equal(row, cells):
    tokens, labels, weights, positions = (np.array(c) for c in zip(*cells[0]))
    for got, want in zip(row, (tokens, labels, weights, positions)):
        np.testing.assert_array_equal(got, want)


def take(loader, count):
    return [next(loader) for _ in range(count)]


def loader(path, dp_rank, dp_size, num_workers, state=None, **kw):
    return make_train_loader(path, seq_length=SEQ, micro_batch_size=MBS, dp_rank=dp_rank, dp_size=dp_size,
                             num_streams=S, num_workers=num_workers, seed=SEED, state=state, **kw)


LAYOUTS = list(itertools.product([1, 2, 4], [0, 1, 2]))


@pytest.mark.parametrize("dp_size, num_workers", LAYOUTS)
def test_global_batches_do_not_depend_on_ranks_or_workers(dataset, dp_size, num_workers):
    steps = 5
    reference = reference_global_rows(dataset, steps * GBS)
    per_rank = GBS // dp_size // MBS  # micro-batches of one rank per global batch
    for rank in range(dp_size):
        batches = take(loader(dataset, rank, dp_size, num_workers), steps * per_rank)
        for step in range(steps):
            rows = {}
            for batch in batches[step * per_rank : (step + 1) * per_rank]:
                rows.update(split_rows(batch))
            # This rank's share of global batch `step`: its streams' rows of that batch, in order.
            mine = [r for r in range(step * GBS, (step + 1) * GBS) if (r % S) % dp_size == rank]
            assert list(rows) == mine
            for index, row in rows.items():
                assert_row_equal(row, reference[index])


def test_epochs_wrap_and_reshuffle(dataset):
    batches = take(loader(dataset, 0, 1, 0), 100)  # 200 rows: 25 per stream
    states = {}
    for batch in batches:
        states.update(batch.stream_states)
    epochs = {int(s): state["epoch"] for s, state in states.items()}
    assert epochs[7] >= 1 and epochs[0] >= 1  # one-shard and two-shard streams both wrapped
    reference = reference_global_rows(dataset, 200)
    for batch in batches:
        for index, row in split_rows(batch).items():
            assert_row_equal(row, reference[index])
    # Reshuffling matters: without it the reference (and the loader) give other rows here.
    unshuffled = reference_global_rows(dataset, 200, shuffle=False)
    assert any(unshuffled[r][0] != reference[r][0] for r in range(200))
    plain = take(loader(dataset, 0, 1, 0, shuffle_shards=False), 100)
    for batch in plain:
        for index, row in split_rows(batch).items():
            assert_row_equal(row, unshuffled[index])


def merged_states(batches_per_rank):
    state = {}
    for batches in batches_per_rank:
        for batch in batches:
            state.update(batch.stream_states)  # what the trainer does: later micro-batches win
    return state


@pytest.mark.parametrize("before, after", [((2, 2), (1, 0)), ((2, 2), (4, 1)), ((1, 0), (2, 2)), ((4, 1), (2, 0))])
@pytest.mark.parametrize("consumed", [3, 4])  # micro-batches per rank: 4 is whole global batches
def test_resume_continues_exactly(dataset, before, after, consumed):
    (d0, w0), (d1, w1) = before, after
    consumed = consumed * 2 // d0  # same number of rows overall whatever the layout
    taken = [take(loader(dataset, r, d0, w0), consumed) for r in range(d0)]
    done = {i for batches in taken for b in batches for i in b.row_indices}
    state = merged_states(taken)
    assert all(set(s) == {"epoch", "shard", "doc", "offset", "rows", "num_streams"} for s in state.values())
    reference = reference_global_rows(dataset, 160)
    next_rows = {}
    for rank in range(d1):
        resumed = take(loader(dataset, rank, d1, w1, state=state), 6 * 2 // d1)
        got = [i for b in resumed for i in b.row_indices]
        # Exactly this rank's rows that were not consumed, in global order: no repeat, no skip.
        expected = [r for r in range(160) if (r % S) % d1 == rank and r not in done][: len(got)]
        assert got == expected
        for batch in resumed:
            next_rows.update(split_rows(batch))
    for index, row in next_rows.items():
        assert_row_equal(row, reference[index])
    if len(done) % GBS == 0:  # resumed at a global batch boundary: the next global batch follows
        assert sorted(next_rows)[:GBS] == list(range(len(done), len(done) + GBS))


def test_resume_mid_round_into_workers(dataset):
    # After rows 0..2, worker 0 (streams 0 2 4 6) would hand out row 4 before worker 1 (1 3 5 7)
    # hands out row 3: the loader must put them back in global order.
    single = dict(seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1, num_streams=S, seed=SEED)
    state = merged_states([take(make_train_loader(dataset, num_workers=0, **single), 3)])
    resumed = take(make_train_loader(dataset, num_workers=2, state=state, **single), 12)
    assert [b.row_indices[0] for b in resumed] == list(range(3, 15))
    reference = reference_global_rows(dataset, 15)
    for batch in resumed:
        for index, row in split_rows(batch).items():
            assert_row_equal(row, reference[index])


@pytest.mark.parametrize("num_streams, dp_size", [(2, 2), (3, 2), (1, 2), (5, 1)])
def test_eval_loader_first_rows_in_global_order(dataset, num_streams, dp_size):
    max_rows = 10
    reference = reference_global_rows(dataset, max_rows, split="valid", num_streams=num_streams, shuffle=False,
                                      one_pass=True)
    rows = {}
    for rank in range(dp_size):
        batches = list(make_eval_loader(dataset, seq_length=SEQ, micro_batch_size=3, dp_rank=rank, dp_size=dp_size,
                                        num_streams=num_streams, max_rows=max_rows))
        assert all(b.num_rows == 3 for b in batches[:-1]) and all(0 < b.num_rows <= 3 for b in batches)
        mine = [i for b in batches for i in b.row_indices]
        assert mine == [r for r in sorted(reference) if (r % num_streams) % dp_size == rank]
        for batch in batches:
            rows.update(split_rows(batch))
    assert sorted(rows) == sorted(reference) == list(range(max_rows))
    for index, row in rows.items():
        assert_row_equal(row, reference[index])


def test_eval_loader_is_one_pass(dataset):
    everything = reference_global_rows(dataset, 10_000, split="valid", num_streams=2, shuffle=False, one_pass=True)
    batches = list(make_eval_loader(dataset, seq_length=SEQ, micro_batch_size=4, dp_rank=0, dp_size=1,
                                    num_streams=2, max_rows=10_000, loss_tokens="answer"))
    got = [i for b in batches for i in b.row_indices]
    assert got == sorted(everything) and len(got) < 100  # stops, no epoch wrap
    answer = reference_global_rows(dataset, 10_000, split="valid", num_streams=2, shuffle=False, one_pass=True,
                                   mode="answer")
    for batch in batches:
        for index, row in split_rows(batch).items():
            assert_row_equal(row, answer[index])


def test_bad_shard_error_or_skip(tmp_path):
    path = tmp_path / "d"
    small_synth(path, train_docs=16, valid_docs=0, docs_per_shard=4)
    bad = path / "train-000001.tar"
    bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(ShardError, match="train-000001.tar"):
        take(make_train_loader(path, seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1, num_streams=2,
                               num_workers=0, seed=0, shuffle_shards=False), 20)
    with pytest.warns(UserWarning, match="train-000001.tar"):
        batches = take(make_train_loader(path, seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1,
                                         num_streams=2, num_workers=0, seed=0, shuffle_shards=False,
                                         on_bad_shard="skip"), 20)
    assert [b.row_indices[0] for b in batches] == list(range(20))
    for name in ("train-000001.tar", "train-000003.tar"):  # stream 1 now has no readable shard at all
        (path / name).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ShardError, match="stream 1 read a whole epoch without a document"):
            take(make_train_loader(path, seq_length=SEQ, micro_batch_size=1, dp_rank=1, dp_size=2, num_streams=2,
                                   num_workers=0, seed=0, on_bad_shard="skip"), 5)


def test_layout_and_state_errors(dataset, tmp_path):
    manifest = read_manifest(dataset)
    check_stream_layout(manifest, num_streams=8, dp_size=2, num_workers=2, global_batch_size=16)
    for (streams, dp, workers, batch), message in [
        ((6, 2, 2, 12), r"num_streams=6 .* dp_size\*num_workers=4"),
        ((4, 2, 0, 10), "global_batch_size=10 .* num_streams=4"),
        ((16, 1, 0, 16), "12 train shards, fewer than num_streams=16"),
        ((4, 0, 0, 16), "dp_size=0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_stream_layout(manifest, num_streams=streams, dp_size=dp, num_workers=workers, global_batch_size=batch)
    with pytest.raises(ValueError, match="12 shards cannot feed num_streams=16"):
        make_train_loader(dataset, seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1, num_streams=16,
                          num_workers=0, seed=0)
    with pytest.raises(ValueError, match="dp_rank=2 .* 0..1"):
        loader(dataset, 2, 2, 0)
    state = take(loader(dataset, 0, 1, 0), 1)[0].stream_states
    with pytest.raises(ValueError, match="saved with num_streams=8; this loader has num_streams=4"):
        make_train_loader(dataset, seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1, num_streams=4,
                          num_workers=0, seed=0, state={"0": state["0"]})
    with pytest.raises(ValueError, match=r"state names streams \['9'\]"):
        loader(dataset, 0, 1, 0, state={"9": state["0"]})
    with pytest.raises(ValueError, match="state of stream 0 must hold"):
        loader(dataset, 0, 1, 0, state={"0": {"epoch": "one"}})
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("some text " * 50)
    from lucid_megatron.data import prepare_dataset

    prepare_dataset([plain / "a.txt"], tmp_path / "prepared", tokenizer="byte", valid_fraction=0.0)
    with pytest.raises(ValueError, match="loss_tokens='answer' needs answer masks"):
        make_train_loader(tmp_path / "prepared", seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1,
                          num_streams=1, num_workers=0, seed=0, loss_tokens="answer")


def test_out_of_vocabulary_token_ids_are_named(tmp_path):
    """A shard whose ids exceed the tokenizer (300 with 259 byte tokens) stops the loader at once, naming it."""
    write_documents(tmp_path / "ds", [[5] * 50, [7] * 20 + [300] + [7] * 20, [9] * 40, [1] * 30], docs_per_shard=2)
    loader = make_train_loader(tmp_path / "ds", seq_length=32, micro_batch_size=1, dp_rank=0, dp_size=1,
                               num_streams=1, num_workers=0, seed=0, shuffle_shards=False)
    with pytest.raises(ShardError, match=r"train-000000\.tar: document 000000001: token id 300 is outside the "
                                         r"tokenizer's vocabulary \[0, 259\)"):
        for _ in range(10):
            next(loader)
