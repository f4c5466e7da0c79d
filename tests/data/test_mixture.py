"""Weighted mixtures of prepared datasets: proportions, layout independence, exact resume, per-source counts,
upsampling of long documents, and the errors that name what is wrong.

Each source here writes tokens from its own range of ids, and its long documents (>= LONG tokens) from the upper
half of that range, so every token of a row tells which source and which kind of document it came from: the
per-source counts in the stream states are checked against the rows themselves.
"""

import itertools
import math

import numpy as np
import pytest

from lucid_megatron.config import ConfigError
from lucid_megatron.config.train import CONFIG_DIR, load_train_config
from lucid_megatron.data import ByteTokenizer, ShardWriter, TrainRows, make_train_loader, read_manifest, write_manifest
from lucid_megatron.data.mixture import DRAW_BLOCK, SourceDraws, check_weights, open_mixture, source_totals
from lucid_megatron.data.streams import SourceShards, Upsample

from .common import small_synth

S, SEQ, MBS, GBS, SEED, PAD = 4, 64, 2, 8, 5, 258
BASES = {"web": 0, "books": 100, "code": 200}  # source -> its first token id: short documents 25 ids, long 25 more
LONG = 100  # tokens: the upsampling threshold of every test below


def write_source(path, name, lengths, docs_per_shard=3, tokenizer=None):
    """A train split of documents of the given lengths, every token in the source's own id range."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(len(lengths))
    with ShardWriter(path, "train", docs_per_shard) as writer:
        for n in lengths:
            writer.add(BASES[name] + (25 if n >= LONG else 0) + rng.integers(0, 25, n))
    write_manifest(path, tokenizer or ByteTokenizer(), False, {"train": writer.info}, {"test": name})
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    return {
        "web": write_source(root / "web", "web", rng.integers(10, 60, 60).tolist()),  # 20 shards
        "books": write_source(root / "books", "books", rng.integers(20, 200, 24).tolist()),  # 8 shards, long ones
        "code": write_source(root / "code", "code", rng.integers(5, 30, 12).tolist()),  # 4 shards: wraps soon
    }


def mixture(sources, weights=None, upsample=None):
    weights = weights or {"web": 0.5, "books": 0.3, "code": 0.2}
    upsample = upsample or {}
    return open_mixture([(name, sources[name], w, upsample.get(name)) for name, w in weights.items()])


def loader(dataset, dp_rank=0, dp_size=1, num_workers=0, state=None, **kw):
    return make_train_loader(dataset, seq_length=SEQ, micro_batch_size=MBS, dp_rank=dp_rank, dp_size=dp_size,
                             num_streams=S, num_workers=num_workers, seed=SEED, state=state, **kw)


def take(it, count):
    return [next(it) for _ in range(count)]


def rows_of(batches) -> dict[int, np.ndarray]:
    rows = {}
    for batch in batches:
        for i, index in enumerate(batch.row_indices):
            rows[index] = batch.tokens[0, i * SEQ:(i + 1) * SEQ].numpy()
    return rows


def merged_states(batches_per_rank):
    state = {}
    for batches in batches_per_rank:
        for batch in batches:
            state.update(batch.stream_states)
    return state


def tokens_by_source(rows, *, long_only=False) -> dict[str, int]:
    tokens = np.concatenate(list(rows))
    low = 25 if long_only else 0
    return {name: int(((tokens >= base + low) & (tokens < base + 50)).sum()) for name, base in BASES.items()}


def within_binomial(count, n, p, sigmas=4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# ---- proportions ----------------------------------------------------------------------------------


def test_draws_follow_the_weights_over_10000_documents():
    weights = np.array([0.5, 0.3, 0.2, 0.0])
    n = 10_000
    for stream in range(3):
        draws = SourceDraws(weights, SEED, stream)
        counts = np.bincount([draws(i) for i in range(n)], minlength=4)
        assert counts[3] == 0  # weight 0: never drawn
        for k in range(3):
            assert within_binomial(counts[k], n, weights[k]), (stream, counts)
    # The draws are a pure function of (seed, stream, n): a fresh object, or one that jumps, agrees.
    first, other = SourceDraws(weights, SEED, 1), SourceDraws(weights, SEED, 1)
    picks = [first(i) for i in range(2 * DRAW_BLOCK + 5)]
    assert [other(i) for i in (2 * DRAW_BLOCK + 4, 3, DRAW_BLOCK)] == [picks[2 * DRAW_BLOCK + 4], picks[3],
                                                                       picks[DRAW_BLOCK]]


def test_a_stream_reads_the_sources_in_proportion(sources):
    mix = mixture(sources)
    rows = TrainRows(mix, seq_length=SEQ, dp_rank=0, dp_size=1, num_streams=S, seed=SEED)
    counts = dict.fromkeys(mix.names, 0)
    for where, tokens, _ in itertools.islice(rows.streams[1].documents(rows.start[1]), 10_000):
        counts[where["source"]] += 1
        assert BASES[where["source"]] <= tokens.min() and tokens.max() < BASES[where["source"]] + 50
    assert rows.start[1]["draws"] == 0  # reading does not change the state it started from
    for name, p in zip(mix.names, mix.probabilities()):
        assert within_binomial(counts[name], 10_000, p), counts


def test_one_source_reads_exactly_the_single_dataset_rows(tmp_path):
    path = tmp_path / "synth"
    small_synth(path, train_docs=48, valid_docs=0, docs_per_shard=4, seed=11)
    single = take(loader(path), 30)
    mixed = take(loader(open_mixture([("synth", path, 1.0, None)])), 30)
    assert [b.row_indices for b in single] == [b.row_indices for b in mixed]
    for a, b in zip(single, mixed):
        for name in ("tokens", "labels", "loss_weight", "position_ids", "cu_seqlens"):
            assert getattr(a, name).equal(getattr(b, name))


# ---- layouts and resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("dp_size, num_workers", [(2, 0), (2, 1), (4, 0), (1, 2)])
def test_rows_do_not_depend_on_ranks_or_workers(sources, dp_size, num_workers):
    mix = mixture(sources)
    steps = 6
    reference = rows_of(take(loader(mix), steps * GBS // MBS))
    rows = {}
    for rank in range(dp_size):
        batches = take(loader(mix, rank, dp_size, num_workers), steps * GBS // MBS // dp_size)
        got = rows_of(batches)
        assert list(got) == [r for r in range(steps * GBS) if (r % S) % dp_size == rank]
        rows.update(got)
    assert sorted(rows) == sorted(reference)
    for index, row in reference.items():
        np.testing.assert_array_equal(rows[index], row)


@pytest.mark.parametrize("before, after", [((2, 0), (1, 0)), ((1, 0), (4, 1)), ((2, 1), (2, 0))])
@pytest.mark.parametrize("consumed", [3, 4])  # micro-batches per rank at DP=2: 4 is whole global batches
def test_resume_mid_mixture_continues_exactly(sources, before, after, consumed):
    (d0, w0), (d1, w1) = before, after
    mix = mixture(sources, upsample={"books": Upsample(LONG, 3)})
    reference = rows_of(take(loader(mix), 40))
    taken = [take(loader(mix, r, d0, w0), consumed * 2 // d0) for r in range(d0)]
    done = {i for batches in taken for b in batches for i in b.row_indices}
    state = merged_states(taken)
    resumed = {}
    for rank in range(d1):
        batches = take(loader(mix, rank, d1, w1, state=state), 8 // d1)
        got = [i for b in batches for i in b.row_indices]
        assert got == [r for r in range(80) if (r % S) % d1 == rank and r not in done][: len(got)]
        resumed.update(rows_of(batches))
    for index, row in resumed.items():
        np.testing.assert_array_equal(row, reference[index])


def test_states_count_each_sources_tokens_and_its_long_documents(sources):
    mix = mixture(sources, upsample={"books": Upsample(LONG, 2), "web": Upsample(LONG, 2)})
    batches = take(loader(mix), 37)  # ends mid global batch, some streams inside a long document
    totals = source_totals(merged_states([batches]).values(), mix.names)
    rows = rows_of(batches).values()
    assert totals.tokens == tokens_by_source(rows)
    assert totals.long_tokens == tokens_by_source(rows, long_only=True)
    assert totals.long_tokens["books"] > 0 and totals.long_tokens["web"] == 0  # web has no long document


def test_a_source_that_runs_out_starts_its_next_epoch(sources):
    mix = mixture(sources, weights={"web": 0.05, "code": 0.95})
    batches = take(loader(mix), 60)
    epochs = source_totals(merged_states([batches]).values(), mix.names).epochs
    assert epochs["code"] >= 1 and epochs["web"] == 0


# ---- upsampling -----------------------------------------------------------------------------------


def test_upsampling_repeats_long_documents_spread_over_the_epoch(sources):
    manifest = read_manifest(sources["books"])
    paths, counts = manifest.shard_paths("train"), manifest.split("train").shard_documents
    reader = SourceShards(0, paths, counts, SEED, True, False, "error", upsample=Upsample(LONG, 3))
    one_epoch = [tokens.tobytes() for where, tokens, _ in itertools.takewhile(
        lambda item: item[0]["epoch"] == 0, reader.documents(0, 0, 0))]
    copies: dict[bytes, list[int]] = {}
    for position, key in enumerate(one_epoch):
        copies.setdefault(key, []).append(position)
    assert len(copies) == manifest.split("train").documents
    long = [key for key in copies if len(key) // 4 >= LONG]
    assert long and all(len(copies[key]) == (3 if key in long else 1) for key in copies)
    # The repeat passes are shuffled in with the shards: most long documents' copies are not next to each other.
    apart = [key for key in long if max(np.diff(copies[key])) > 1]
    assert len(apart) >= len(long) / 2
    # Without upsampling the source reads exactly as a single dataset (same order key for source 0).
    plain = SourceShards(0, paths, counts, SEED, True, False, "error")
    assert plain.order(4) == np.random.default_rng([SEED, 4, 0]).permutation(len(paths)).tolist()


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, message", [
    ([1.0, -0.5], r"source 'b': weight -0.5 must be a finite number >= 0"),
    ([float("nan"), 1.0], r"source 'a': weight nan must be a finite number >= 0"),
    ([1.0, "lots"], r"source 'b': weight 'lots' is not a number"),
    ([0, 0.0], r"every source weight is 0 \(a, b\)"),
])
def test_bad_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        check_weights(["a", "b"], weights)


@pytest.mark.parametrize("sources_yaml, message", [
    ("[{path: a, weight: -1}]", r"^data.sources\[0\].weight: must be a number >= 0, got -1.0$"),
    ("[{path: a}, {path: b, weight: .nan}]", r"^data.sources\[1\].weight: expected a finite number, got nan$"),
    ("[{path: a, weight: heavy}]", r"^data.sources\[0\].weight: expected float, got 'heavy'$"),
    ("[{path: a, weight: 0}, {path: b, weight: 0}]", r"^data.sources: every weight is 0 \(a, b\)"),
    ("[{path: x/a}, {path: y/a}]", r"^data.sources: names \['a'\] given more than once"),
    ("[{path: a, upsample: {min_tokens: 0}}]", r"^data.sources\[0\].upsample.min_tokens: must be >= 1"),
])
def test_bad_mixture_configs_are_one_line_errors(sources_yaml, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_train_config(CONFIG_DIR / "demo.yaml", ["data.path=", "data.synth=", f"data.sources={sources_yaml}"])
    assert "\n" not in str(err.value)


def test_path_and_sources_are_exclusive():
    with pytest.raises(ConfigError, match="data.path: give either data.path .* not both"):
        load_train_config(CONFIG_DIR / "demo.yaml", ["data.synth=", "data.sources=[{path: a}]"])
    with pytest.raises(ConfigError, match="data.synth: writes the dataset at data.path"):
        load_train_config(CONFIG_DIR / "demo.yaml", ["data.path=", "data.sources=[{path: a}]"])


def test_sources_with_different_tokenizers_are_refused_naming_both(sources, tmp_path):
    other = dict(ByteTokenizer().manifest_entry(), name="byte-v2")
    write_source(tmp_path / "other", "web", [20] * 8, tokenizer=other)
    with pytest.raises(ValueError, match=r"sources 'web' and 'other' use different tokenizers: 'byte-v1' \(.*web/"
                                         r"manifest.json\) and 'byte-v2' \(.*other/manifest.json\)"):
        open_mixture([("web", sources["web"], 1.0, None), ("other", tmp_path / "other", 1.0, None)])


def test_layout_and_state_errors_name_the_source(sources):
    mix = mixture(sources)
    with pytest.raises(ValueError, match=r"source 'code' \(.*code\): 4 shards cannot feed num_streams=8"):
        make_train_loader(mix, seq_length=SEQ, micro_batch_size=1, dp_rank=0, dp_size=1, num_streams=8,
                          num_workers=0, seed=0)
    state = merged_states([take(loader(mix), 4)])
    fewer = mixture(sources, weights={"web": 1.0, "books": 1.0})
    with pytest.raises(ValueError, match=r"saved with sources \['books', 'code', 'web'\]; this mixture has "
                                         r"\['books', 'web'\]"):
        loader(fewer, state=state)
    plain_state = {"0": {"epoch": 0, "shard": 0, "doc": 0, "offset": 0, "rows": 0, "num_streams": S}}
    with pytest.raises(ValueError, match="state of stream 0 must hold non-negative integers draws"):
        loader(mix, state=plain_state)
    # New weights on resume are allowed: the document under way is finished from its own source (the state
    # names it), later draws follow the new weights.
    resumed = rows_of(take(loader(mixture(sources, weights={"web": 0.0, "books": 0.0, "code": 1.0}), state=state), 4))
    under_way = {int(s): st["current"] for s, st in state.items() if st["offset"]}
    assert under_way  # the saved position is inside a document on some stream
    for stream, name in under_way.items():
        first_row = resumed[state[str(stream)]["rows"] * S + stream]
        assert BASES[name] <= first_row[0] < BASES[name] + 50, (stream, name, first_row[:4])
    for stream in range(S):  # after the document under way, only code: once a code token appears, nothing else
        tokens = np.concatenate([row for index, row in sorted(resumed.items()) if index % S == stream])
        tokens = tokens[tokens != PAD]
        is_code = (tokens >= BASES["code"]) & (tokens < BASES["code"] + 50)
        assert is_code.any() and is_code[int(np.argmax(is_code)):].all(), stream
