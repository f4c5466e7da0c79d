"""`lucid eval niah | ppl` on real checkpoints: the evaluator can tell a trained model from an untrained one,
and its numbers do not depend on the batch size or the tensor/context-parallel layout."""

import json
import subprocess

import numpy as np
import pytest

from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from lucid_megatron.runtime.commands import NiahOptions, niah_command, process_command
from tests.train.runs import run_train, train_env, write_config

# An easy needle task the tiny model learns in about 100 CPU steps: one key -> digit pair to copy.
TASK = RetrievalTask(min_len=32, max_len=56, num_needles=1, num_queries=1, key_len=1, value_len=1, filler_words=4)
NIAH_TASK = dict(needles=1, queries=1, key_len=1, value_len=1, filler_words=4)
CHANCE = 0.1  # one digit out of ten
TRAIN = ["train.steps=150", "train.seq_length=64", "train.global_batch_size=16", "train.micro_batch_size=16",
         "data.loss_tokens=answer", "optimizer.lr=3e-3", "schedule.warmup_fraction=0.05", "logging.interval=50"]


def lucid(*args, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run(process_command(args), capture_output=True, text=True, timeout=timeout, env=train_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(dataset, untrained checkpoint, trained checkpoint) of the tiny model on the easy needle task."""
    root = tmp_path_factory.mktemp("eval")
    dataset = root / "needles"
    write_synth_dataset(dataset, TASK, train_docs=4000, valid_docs=64, docs_per_shard=500, seed=0,
                        tokenizer=ByteTokenizer())
    config = write_config(root, dataset)
    # One step at a negligible learning rate: the checkpoint holds the initial weights.
    run_train(config, root / "untrained", overrides=["train.steps=1", "optimizer.lr=1e-12"])
    run_train(config, root / "trained", overrides=TRAIN, timeout=900)
    return dataset, root / "untrained" / "checkpoints", root / "trained" / "checkpoints"


def _niah(tmp_path, name, checkpoints, *, batch_size=None, lengths=(40, 56), samples=80, **models_and_layout):
    """`lucid eval niah` of the easy task; ``models_and_layout``: niah_command's hf, labels, plot, parallel sizes."""
    out = tmp_path / f"{name}.json"
    options = NiahOptions(lengths=list(lengths), **NIAH_TASK, num_samples=samples, seed=7, batch_size=batch_size)
    lucid(*niah_command(options, checkpoints=checkpoints, out=out, **models_and_layout))
    return json.loads(out.read_text())


def test_niah_is_chance_level_before_training_and_higher_after(runs, tmp_path):
    _, untrained, trained = runs
    plot = tmp_path / "niah.png"
    result = _niah(tmp_path, "both", [untrained, trained], labels=["untrained", "trained"], plot=plot)
    for length in ("40", "56"):
        before = result["models"]["untrained"][length]
        after = result["models"]["trained"][length]
        assert before["queries"] == after["queries"] == 80
        # 80 queries: chance is 8 +- 2.7 hits; 16 would be three standard deviations above it.
        assert before["exact_match"] <= 2 * CHANCE, before
        assert after["exact_match"] >= before["exact_match"] + 0.3, (before, after)
        # an untrained model spreads its probability over its whole output vocabulary (259 byte tokens padded
        # to 384): about ln(384) nats per answer token
        assert abs(before["answer_loss"] - np.log(384)) < 0.5, before
        assert after["answer_loss"] < np.log(10) < before["answer_loss"], (before, after)
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_niah_independent_of_batch_size_and_parallel_layout(runs, tmp_path):
    _, _, trained = runs
    reference = _niah(tmp_path, "b1", [trained], labels=["trained"], batch_size=1)["models"]["trained"]
    layouts = {
        "batch 7": dict(batch_size=7),
        "tp 2": dict(batch_size=3, tensor_parallel_size=2),
        "cp 2 p2p": dict(batch_size=5, context_parallel_size=2, cp_comm_type="p2p"),
        "cp 2 a2a": dict(batch_size=5, context_parallel_size=2, cp_comm_type="a2a"),
    }
    for name, layout in layouts.items():
        got = _niah(tmp_path, name.replace(" ", "_"), [trained], labels=["trained"], **layout)["models"]["trained"]
        _assert_same_scores(got, reference, name)


def _assert_same_scores(got: dict, want: dict, name: str) -> None:
    """Counts equal; the answer loss (a float sum) equal to fp32 rounding (1e-5 relative)."""
    assert got.keys() == want.keys(), name
    for length in want:
        loss = got[length].pop("answer_loss"), want[length]["answer_loss"]
        assert got[length] == {k: v for k, v in want[length].items() if k != "answer_loss"}, (name, length)
        np.testing.assert_allclose(*loss, rtol=1e-5, err_msg=f"{name} at {length}")


def test_score_reads_the_answer_tokens_and_their_losses():
    from lucid_megatron.eval.niah import score

    tokens = np.array([256, 10, 11, 12, 13, 14, 257])
    mask = np.array([0, 0, 1, 1, 0, 1, 0], dtype=np.uint8)  # two answers: tokens 2-3 and token 5
    predictions = np.array([0, 11, 12, 0, 14, 0, 0])  # position p - 1 predicts token p: 2, 3 and 5 right
    losses = np.array([9.0, 0.5, 0.25, 9.0, 2.0, 9.0, 0.0])  # losses[p - 1] is token p's
    got = score(predictions, losses, tokens, mask)
    np.testing.assert_array_equal(got, [2, 2, 3, 3, 0.5 + 0.25 + 2.0])
    predictions[1] = 99  # a wrong first token makes the first answer wrong, not the second
    np.testing.assert_array_equal(score(predictions, losses, tokens, mask), [1, 2, 2, 3, 2.75])


def test_ppl_by_position_independent_of_batch_and_layout(runs, tmp_path):
    dataset, _, trained = runs
    results = {}
    for name, extra in {"tp1": ["--batch-size", 1], "tp2": ["--batch-size", 4, "--tensor-parallel-size", 2],
                        "cp2": ["--batch-size", 3, "--context-parallel-size", 2]}.items():
        out = tmp_path / f"{name}.json"
        lucid("eval", "ppl", "--checkpoint", trained, "--data", dataset, "--seq-length", 64, "--rows", 12,
              "--bucket-size", 16, "--out", out, "--plot", tmp_path / f"{name}.png", *extra)
        results[name] = json.loads(out.read_text())
    reference = results["tp1"]
    assert reference["tokens"] > 12 * 40
    assert list(reference["by_position"]) == ["0-15", "16-31", "32-47", "48-63"]  # documents of 32-56 tokens
    # the loss is a mean over buckets weighted by their token counts
    weighted = sum(b["loss"] * b["tokens"] for b in reference["by_position"].values()) / reference["tokens"]
    assert reference["loss"] == pytest.approx(weighted, rel=1e-9)
    for name in ("tp2", "cp2"):
        got = results[name]
        assert got["tokens"] == reference["tokens"]
        for bucket, want in reference["by_position"].items():
            assert got["by_position"][bucket]["tokens"] == want["tokens"]
            np.testing.assert_allclose(got["by_position"][bucket]["loss"], want["loss"], rtol=1e-5, err_msg=name)


def test_niah_rejects_bad_input(runs, tmp_path):
    _, _, trained = runs
    too_short = niah_command(NiahOptions(lengths=[8], needles=2), checkpoints=[trained])
    result = subprocess.run(process_command(too_short), capture_output=True, text=True, timeout=300, env=train_env())
    assert result.returncode == 2
    assert "--lengths [8]" in result.stderr and "minimum" in result.stderr
    missing = niah_command(NiahOptions(lengths=[64]), checkpoints=[tmp_path / "missing"])
    result = subprocess.run(process_command(missing), capture_output=True, text=True, timeout=300, env=train_env())
    assert result.returncode == 2 and "missing" in result.stderr


def test_niah_on_the_hugging_face_export_matches_the_checkpoint(runs, tmp_path):
    _, _, trained = runs
    exported = tmp_path / "hf"
    lucid("convert", "to-hf", trained.parent, exported)
    result = _niah(tmp_path, "hf", [trained], hf=[exported], labels=["megatron", "hf"])
    megatron, hf = result["models"]["megatron"], result["models"]["hf"]
    # fp32 logits agree to ~1e-7, so greedy predictions (and every count) are the same, and the answer loss
    # (cross-entropy from Megatron's and from the Hugging Face model's logits) to fp32 rounding
    _assert_same_scores(hf, megatron, "hf")
    assert megatron["40"]["exact_match"] > 2 * CHANCE


def test_niah_options_build_the_task_they_name():
    import dataclasses

    from lucid_megatron.cli import build_parser
    from lucid_megatron.eval.cli import task_from_args

    options = NiahOptions(lengths=[64, 128], needles=3, queries=2, updates=4, key_len=1, value_len=2, key_vocab=5,
                          value_vocab=3, template="compact", filler_words=6)
    args = build_parser().parse_args(niah_command(options, checkpoints=["c"]))
    task = task_from_args(args)
    want = dict(num_needles=3, num_queries=2, updates=4, key_len=1, value_len=2, key_vocab=5, value_vocab=3,
                template="compact", filler_words=6)
    assert {k: getattr(task, k) for k in want} == want
    # every task field is an option (nothing silently left at its default), bar the lengths set per document
    assert {f.name for f in dataclasses.fields(task)} == set(want) | {"min_len", "max_len"}


class _RecallScorer:
    """A stand-in model for the MQAR scorer's bookkeeping (the real model is scored by the CLI test below):
    after a queried key it predicts the value the key was given ``which`` ("first" or "latest"), with a loss
    of 0.25 when right and 3.0 when wrong."""

    def __init__(self, which: str, key_vocab: int):
        self.which, self.key_vocab = which, key_vocab

    def next_token_scores(self, documents):
        scored = []
        for tokens in documents:
            predictions, losses, given = np.zeros(len(tokens), dtype=np.int64), np.zeros(len(tokens)), {}
            for p in range(1, len(tokens) - 1, 2):
                key, value = int(tokens[p]), int(tokens[p + 1])
                known = given.get(key)
                predictions[p] = (known[0] if self.which == "first" else known[-1]) if known else 0
                losses[p] = 0.25 if predictions[p] == value else 3.0
                given.setdefault(key, []).append(value)
            scored.append((predictions, losses))
        return scored


def test_mqar_scores_count_every_query_by_times_its_key_was_assigned():
    from lucid_megatron.data.mqar import MqarTask
    from lucid_megatron.eval import mqar

    task = MqarTask(min_pairs=1, max_pairs=8, key_vocab=16, value_vocab=9, updates=2)
    kwargs = dict(num_samples=40, seed=1, batch_size=7)
    latest = mqar.evaluate(_RecallScorer("latest", 16), task, [4, 8], **kwargs)
    first = mqar.evaluate(_RecallScorer("first", 16), task, [4, 8], **kwargs)
    for n in (4, 8):
        assert latest[n]["queries"] == first[n]["queries"] == 40 * n
        assert latest[n]["exact_match"] == 1.0 and latest[n]["answer_loss"] == pytest.approx(0.25, abs=1e-12)
        by_updates = first[n]["by_updates"]
        assert sorted(by_updates) == [1, 2] and sum(r["queries"] for r in by_updates.values()) == 40 * n
        # the first value is the answer exactly when the key was assigned once (an update changes the value)
        assert by_updates[1]["exact_match"] == 1.0 and by_updates[2]["exact_match"] == 0.0
        once = by_updates[1]["queries"] / (40 * n)
        assert first[n]["exact_match"] == pytest.approx(once, abs=1e-12)
        assert first[n]["answer_loss"] == pytest.approx(0.25 * once + 3.0 * (1 - once), abs=1e-12)


def test_mqar_command_on_a_real_checkpoint(runs, tmp_path):
    from lucid_megatron.runtime.commands import MqarOptions

    _, untrained, _ = runs
    out, plot = tmp_path / "mqar.json", tmp_path / "mqar.png"
    options = MqarOptions(pairs=[4, 16], key_vocab=32, value_vocab=32, updates=2, num_samples=10, seed=3, batch_size=4)
    lucid(*niah_command(options, checkpoints=[untrained], labels=["untrained"], out=out, plot=plot))
    result = json.loads(out.read_text())
    assert result["task"]["pairs"] == [4, 16] and result["task"]["updates"] == 2
    for n in ("4", "16"):
        row = result["models"]["untrained"][n]
        assert row["queries"] == 10 * int(n) and sum(r["queries"] for r in row["by_updates"].values()) == row["queries"]
        # untrained: at most a few of the 32 values by luck, and about ln(384) nats (see the niah test)
        assert row["exact_match"] <= 0.15 and abs(row["answer_loss"] - np.log(384)) < 0.5, row
    assert plot.stat().st_size > 1000
    bad = subprocess.run(process_command(niah_command(MqarOptions(pairs=[40], key_vocab=32), checkpoints=[untrained])),
                         capture_output=True, text=True, timeout=300, env=train_env())
    assert bad.returncode == 2 and "--pairs [40]" in bad.stderr and "--key-vocab 32" in bad.stderr, bad.stderr
