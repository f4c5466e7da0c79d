"""MQAR and key-update documents: the layout, the latest value as the answer, answer masks, shards, errors."""

import numpy as np
import pytest

from lucid_megatron.data import ByteTokenizer, iter_shard_documents, write_synth_dataset
from lucid_megatron.data.mqar import MqarTask, generate_mqar_document

KEY_UPDATE = MqarTask(min_pairs=3, max_pairs=9, key_vocab=20, value_vocab=7, updates=4)


def _replay(tokens: np.ndarray, task: MqarTask):
    """Read a document back the slow way: every (key, value) pair in order; None if the layout is broken."""
    body = tokens[1:-1].tolist()
    assert tokens[0] == ByteTokenizer.bos_id and tokens[-1] == ByteTokenizer.eos_id and len(body) % 2 == 0
    pairs = list(zip(body[0::2], body[1::2]))
    for key, value in pairs:
        assert 0 <= key < task.key_vocab and task.key_vocab <= value < task.key_vocab + task.value_vocab
    return pairs


@pytest.mark.parametrize("task", [MqarTask(), KEY_UPDATE], ids=["mqar", "key-update"])
def test_queries_ask_every_key_once_and_the_answer_is_its_latest_value(task):
    rng = np.random.default_rng(5)
    seen_counts, seen_pairs = set(), set()
    for _ in range(200):
        tokens, mask, meta = generate_mqar_document(rng, task, ByteTokenizer())
        pairs = _replay(tokens, task)
        n = meta["pairs"]
        assert task.min_pairs <= n <= task.max_pairs and len(tokens) == meta["length"] <= task.max_length()
        assignments, queries = pairs[: meta["assignments"]], pairs[meta["assignments"] :]
        assert len(queries) == n and len({k for k, _ in assignments}) == n
        assert sorted(k for k, _ in queries) == sorted({k for k, _ in assignments})  # every key, once
        latest, times, previous = {}, {}, {}
        for key, value in assignments:
            assert previous.get(key) != value  # an update always changes the value
            previous[key] = latest[key] = value
            times[key] = times.get(key, 0) + 1
        # the answers, and only they, carry the mask; each is the key's latest value
        answer_positions = [1 + 2 * meta["assignments"] + 2 * q + 1 for q in range(n)]
        assert np.flatnonzero(mask).tolist() == answer_positions
        assert meta["queries"] == [(k, latest[k], p, times[k]) for (k, _), p in zip(queries, answer_positions)]
        assert all(1 <= t <= task.updates for t in times.values())
        seen_counts.update(times.values())
        seen_pairs.add(n)
    assert seen_counts == set(range(1, task.updates + 1)) and seen_pairs == set(range(task.min_pairs, task.max_pairs + 1))


def test_fixed_number_of_pairs_and_determinism():
    one = generate_mqar_document(np.random.default_rng([1, 2]), KEY_UPDATE, ByteTokenizer(), pairs=20)
    two = generate_mqar_document(np.random.default_rng([1, 2]), KEY_UPDATE, ByteTokenizer(), pairs=20)
    np.testing.assert_array_equal(one[0], two[0])
    assert one[2]["pairs"] == 20 and one[2] == two[2]
    with pytest.raises(ValueError, match="pairs=21: allowed 1..key_vocab=20"):
        generate_mqar_document(np.random.default_rng(0), KEY_UPDATE, ByteTokenizer(), pairs=21)


@pytest.mark.parametrize("fields, message", [
    ({"min_pairs": 0}, "MqarTask.min_pairs=0: must be a positive integer"),
    ({"min_pairs": 9, "max_pairs": 8}, "min_pairs=9 exceeds max_pairs=8"),
    ({"max_pairs": 65}, "max_pairs=65 needs as many distinct keys; key_vocab=64"),
    ({"updates": 2, "value_vocab": 1}, "updates=2 needs values that can change"),
    ({"updates": True}, "MqarTask.updates=True"),
])
def test_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MqarTask(**fields)


def test_mqar_dataset_round_trips_through_the_shards_and_refuses_special_ids(tmp_path):
    manifest = write_synth_dataset(tmp_path / "ku", KEY_UPDATE, train_docs=21, valid_docs=5, docs_per_shard=8,
                                   seed=3, tokenizer=ByteTokenizer())
    assert manifest.source["kind"] == "mqar" and manifest.source["task"]["updates"] == 4
    for index, split in enumerate(("train", "valid")):
        rng = np.random.default_rng([3, index])  # the split's documents, regenerated
        want = [generate_mqar_document(rng, KEY_UPDATE, ByteTokenizer())[:2]
                for _ in range(manifest.splits[split].documents)]
        got = [doc for shard in manifest.splits[split].shards for doc in iter_shard_documents(manifest.dir / shard)]
        assert len(got) == len(want) == {"train": 21, "valid": 5}[split]
        for (tokens, mask), (want_tokens, want_mask) in zip(got, want):
            np.testing.assert_array_equal(tokens, want_tokens)
            np.testing.assert_array_equal(mask, want_mask)
    with pytest.raises(ValueError, match=r"key_vocab \+ value_vocab = 257 token ids .* special ids \[256, 257, 258\]"):
        write_synth_dataset(tmp_path / "bad", MqarTask(key_vocab=200, value_vocab=57), train_docs=1, valid_docs=0,
                            docs_per_shard=1, seed=0, tokenizer=ByteTokenizer())
    assert not (tmp_path / "bad").exists()


def test_an_experiment_refuses_a_dataset_of_another_task_at_data_path(tmp_path):
    from lucid_megatron.config.train import DataConfig, SynthConfig
    from lucid_megatron.data.synth import ensure_synth_dataset, synth_mismatch

    data = DataConfig(path=str(tmp_path / "d"), synth=SynthConfig(mqar=MqarTask(updates=1), train_docs=4, valid_docs=1))
    assert ensure_synth_dataset(data, say=lambda _: None, strict=True) and synth_mismatch(data) is None
    assert not ensure_synth_dataset(data, say=lambda _: None, strict=True)  # there already: kept
    key_update = DataConfig(path=data.path, synth=SynthConfig(mqar=MqarTask(updates=3), train_docs=4, valid_docs=1))
    with pytest.raises(ValueError, match=r"holds a synthetic dataset of task .*'updates': 1.*'updates': 3"):
        ensure_synth_dataset(key_update, say=lambda _: None, strict=True)
    assert not ensure_synth_dataset(key_update, say=lambda _: None)  # lucid train: a dataset there is used as is


def test_mqar_config_section_and_its_refusals():
    from pathlib import Path

    from lucid_megatron.config.schema import ConfigError
    from lucid_megatron.config.train import load_train_config

    base = Path(__file__).resolve().parents[2] / "configs" / "repro" / "mqar" / "base.yaml"
    cfg = load_train_config(base, ["data.synth.mqar.updates=3"])
    assert cfg.data.synth.mqar == MqarTask(min_pairs=4, max_pairs=8, key_vocab=64, value_vocab=64, updates=3)
    with pytest.raises(ConfigError, match="task and mqar are both set"):
        load_train_config(base, ["data.synth.task.num_needles=2"])
    with pytest.raises(ConfigError, match="final_eval.task: required when data.synth is not set or writes MQAR"):
        load_train_config(base, ["final_eval.lengths=[64]"])
