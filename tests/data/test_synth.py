"""Synthetic retrieval documents: exact lengths, determinism, answer masks, validation."""

import re

import numpy as np
import pytest

from lucid_megatron.data import (
    ByteTokenizer, RetrievalTask, generate_retrieval_document, iter_shard_documents, load_tokenizer,
    write_synth_dataset,
)
from lucid_megatron.data.synth import filler_word_list

from .common import build_hf_tokenizer

NEEDLE = re.compile(r" key ([A-Z]+) is ([0-9]+)\.")
QUERY = re.compile(r" what is ([A-Z]+)\? ([0-9]+)\.")


def _documents(task, count, seed=0, tokenizer=None):
    rng = np.random.default_rng(seed)
    return [generate_retrieval_document(rng, task, tokenizer or ByteTokenizer()) for _ in range(count)]


def test_lengths_are_exact_and_cover_the_range():
    task = RetrievalTask(min_len=100, max_len=104, num_needles=3, num_queries=2)
    lengths = []
    for tokens, mask, meta in _documents(task, 200):
        assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and len(mask) == len(tokens)
        assert len(tokens) == meta["length"]
        assert tokens[0] == 256 and tokens[-1] == 257 and (tokens[1:-1] < 256).all()
        lengths.append(len(tokens))
    assert set(lengths) == {100, 101, 102, 103, 104}


def test_minimum_length_document_has_no_filler():
    task = RetrievalTask(min_len=2 + 2 * 18 + 20, max_len=2 + 2 * 18 + 20, num_needles=2, num_queries=1)
    tokens, _, _ = _documents(task, 1)[0]
    text = ByteTokenizer().decode(tokens)
    assert re.fullmatch(r"( key [A-Z]{4} is [0-9]{4}\.){2} what is [A-Z]{4}\? [0-9]{4}\.", text)


def test_text_needles_queries_and_answer_mask():
    tok = ByteTokenizer()
    task = RetrievalTask(min_len=200, max_len=400, num_needles=5, num_queries=3, key_len=3, value_len=5,
                         filler_words=20)
    vocabulary = filler_word_list(20)
    assert len(set(vocabulary)) == 20 and all(re.fullmatch("[a-z]+", w) for w in vocabulary)
    for tokens, mask, meta in _documents(task, 50, seed=3):
        text = tok.decode(tokens)  # all ASCII: character i is token i + 1 (after BOS)
        needles = {m.group(1): m.group(2) for m in NEEDLE.finditer(text)}
        assert len(needles) == 5 and all(len(k) == 3 for k in needles)
        queries = list(QUERY.finditer(text))
        assert len(queries) == 3 and len({q.group(1) for q in queries}) == 3
        assert text.endswith(queries[-1].group(0))  # queries come last
        expected = np.zeros(len(tokens), dtype=np.uint8)
        for q in queries:
            assert needles[q.group(1)] == q.group(2)  # the answer is the needle's value
            expected[1 + q.start(2) : 1 + q.end(2)] = 1
        np.testing.assert_array_equal(mask, expected)
        # The haystack is lowercase words from the fixed list, nothing else.
        haystack = QUERY.sub("", NEEDLE.sub("", text))
        words = haystack.split(" ")[1:]
        assert haystack == "".join(" " + w for w in words)
        outside = [w for w in words if w not in vocabulary]
        assert len(outside) <= 1 and all(any(v.startswith(w) for v in vocabulary) for w in outside)  # one cut word
        assert [(k, v) for k, v, _ in meta["needles"]] == [(m.group(1), m.group(2)) for m in NEEDLE.finditer(text)]
        for key, value, position in meta["needles"]:
            assert tok.decode(tokens[position : position + 5 + len(key)]) == f" key {key}"
        for key, value, position in meta["queries"]:
            assert tok.decode(tokens[position : position + len(value)]) == value and mask[position] == 1


def test_deterministic_given_the_rng():
    task = RetrievalTask()
    a, b, c = _documents(task, 5, seed=7), _documents(task, 5, seed=7), _documents(task, 5, seed=8)
    for (ta, ma, _), (tb, mb, _) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ma, mb)
    assert any(len(x[0]) != len(y[0]) or (x[0] != y[0]).any() for x, y in zip(a, c))


def test_hf_tokenizer_documents(tmp_path):
    tok = load_tokenizer(str(build_hf_tokenizer(tmp_path / "t")))
    task = RetrievalTask(min_len=120, max_len=160, num_needles=3, num_queries=2, key_len=2, value_len=2)
    for tokens, mask, meta in _documents(task, 20, tokenizer=tok):
        assert len(tokens) == meta["length"] and 120 <= len(tokens) <= 160
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        answers = np.flatnonzero(mask)
        values = [v for _, v, _ in meta["queries"]]
        assert tok.decode(tokens[answers]) == "".join(values)
        needles = dict((k, v) for k, v, _ in meta["needles"])
        assert all(needles[k] == v for k, v, _ in meta["queries"])
        assert [q.group(2) for q in QUERY.finditer(tok.decode(tokens))] == values


@pytest.mark.parametrize("fields, message", [
    ({"min_len": 0}, "min_len=0"),
    ({"value_len": -1}, "value_len=-1"),
    ({"num_needles": 2.5}, "num_needles=2.5"),
    ({"min_len": 300, "max_len": 200}, "min_len=300 exceeds max_len=200"),
    ({"num_needles": 2, "num_queries": 3}, "num_queries=3 exceeds num_needles=2"),
    ({"key_len": 1, "num_needles": 27, "min_len": 2000, "max_len": 2000}, "key_len=1"),
    ({"filler_words": 5000}, "filler_words=5000"),
    # 2 + 4 needles * 18 + 1 query * 20 = 94 byte tokens
    ({"min_len": 93}, "min_len=93 .* minimum is 94"),
])
def test_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        RetrievalTask(**fields)
    RetrievalTask(min_len=94)  # the minimum itself is accepted


def test_synth_dataset_is_byte_identical_per_seed(tmp_path):
    task = RetrievalTask(min_len=64, max_len=128, num_needles=2)
    kwargs = dict(train_docs=30, valid_docs=7, docs_per_shard=8, tokenizer=ByteTokenizer())
    one = write_synth_dataset(tmp_path / "one", task, seed=5, **kwargs)
    two = write_synth_dataset(tmp_path / "two", task, seed=5, **kwargs)
    other = write_synth_dataset(tmp_path / "other", task, seed=6, **kwargs)
    names = sorted(p.name for p in one.dir.iterdir())
    assert names == ["manifest.json"] + [f"train-00000{i}.tar" for i in range(4)] + ["valid-000000.tar"]
    for name in names:
        assert (one.dir / name).read_bytes() == (two.dir / name).read_bytes()
    assert (one.dir / "train-000000.tar").read_bytes() != (other.dir / "train-000000.tar").read_bytes()
    # Train and valid draw from different streams: the first documents differ.
    first = [next(iter_shard_documents(one.dir / f"{s}-000000.tar"))[0] for s in ("train", "valid")]
    assert len(first[0]) != len(first[1]) or (first[0] != first[1]).any()
    assert one.has_answer_mask and one.splits["train"].documents == 30 and one.splits["valid"].documents == 7
    with pytest.raises(FileExistsError, match="not empty"):
        write_synth_dataset(tmp_path / "one", task, seed=5, **kwargs)


ASSIGN = re.compile(r" ([A-Z]+)([0-9]+)")
ASK = re.compile(r" \?([A-Z]+)([0-9]+)")
KEY_UPDATE = RetrievalTask(min_len=90, max_len=140, num_needles=3, num_queries=2, updates=4, key_len=1, value_len=1,
                           key_vocab=5, value_vocab=3, filler_words=6, template="compact")


def test_key_update_answer_is_the_latest_value():
    tok = ByteTokenizer()
    asked_earlier_value = 0
    for tokens, mask, meta in _documents(KEY_UPDATE, 200, seed=4):
        text = tok.decode(tokens)
        history: dict[str, list[str]] = {}
        for m in ASSIGN.finditer(text):  # read the document left to right, as the model does
            history.setdefault(m.group(1), []).append(m.group(2))
        assert len(history) == 3 and all(len(values) == 4 for values in history.values())
        assert set("".join(history)) <= set("ABCDE") and set("".join(sum(history.values(), []))) <= set("012")
        for values in history.values():  # every update changes the value
            assert all(a != b for a, b in zip(values, values[1:])), values
        queries = list(ASK.finditer(text))
        assert len(queries) == 2 and text.endswith(queries[-1].group(0))
        expected = np.zeros(len(tokens), dtype=np.uint8)
        for q in queries:
            assert q.group(2) == history[q.group(1)][-1]  # the latest value, not the first or any other
            asked_earlier_value += q.group(2) != history[q.group(1)][0]
            expected[1 + q.start(2) : 1 + q.end(2)] = 1
        np.testing.assert_array_equal(mask, expected)
        assert [(k, v) for k, v, _ in meta["needles"]] == [m.groups() for m in ASSIGN.finditer(text)]
        assert [(k, v) for k, v, _ in meta["queries"]] == [q.groups() for q in queries]
        for key, value, position in meta["queries"]:
            assert tok.decode(tokens[position : position + 1]) == value and mask[position] == 1
        # the haystack between assignments is words of the fixed list (the last one possibly cut)
        words = ASK.sub("", ASSIGN.sub("", text)).split()
        assert all(any(v.startswith(w) for v in filler_word_list(6)) for w in words)
    assert asked_earlier_value > 100  # the first value is usually not the answer: recall alone is not enough


def test_key_update_minimum_length_and_validation():
    # 2 + 3 keys x 4 assignments x 3 tokens (" A3") + 2 queries x 4 tokens (" ?A3") = 46
    assert KEY_UPDATE.minimum_length() == 46
    tokens, _, _ = _documents(RetrievalTask(**{**KEY_UPDATE.__dict__, "min_len": 46, "max_len": 46}), 1)[0]
    assert re.fullmatch(r"( [A-E][0-2]){12}( \?[A-E][0-2]){2}", ByteTokenizer().decode(tokens))
    for fields, message in [({"template": "prose"}, "template='prose'; allowed: \\['compact', 'sentence'\\]"),
                            ({"value_vocab": 1}, "updates=4 needs values that can change"),
                            ({"key_vocab": 2}, "key_vocab=2 allows only 2 distinct keys"),
                            ({"key_vocab": 27}, "key_vocab=27"), ({"updates": 0}, "updates=0"),
                            ({"min_len": 45}, "min_len=45 .* minimum is 46")]:
        with pytest.raises(ValueError, match=message):
            RetrievalTask(**{**KEY_UPDATE.__dict__, **fields})


def test_key_update_documents_round_trip_through_the_shards(tmp_path):
    manifest = write_synth_dataset(tmp_path / "ku", KEY_UPDATE, train_docs=21, valid_docs=5, docs_per_shard=8,
                                   seed=3, tokenizer=ByteTokenizer())
    assert manifest.source["task"]["updates"] == 4 and manifest.source["task"]["template"] == "compact"
    for index, split in enumerate(("train", "valid")):
        rng = np.random.default_rng([3, index])  # the split's documents, regenerated
        want = [generate_retrieval_document(rng, KEY_UPDATE, ByteTokenizer())[:2]
                for _ in range(manifest.splits[split].documents)]
        got = [doc for shard in manifest.splits[split].shards
               for doc in iter_shard_documents(manifest.dir / shard)]
        assert len(got) == len(want) == {"train": 21, "valid": 5}[split]
        for (tokens, mask), (want_tokens, want_mask) in zip(got, want):
            np.testing.assert_array_equal(tokens, want_tokens)
            np.testing.assert_array_equal(mask, want_mask)
