"""``lucid data synth`` and ``lucid data prepare`` end to end, in a subprocess as a user runs them. Bad input
exits 2, as in every subcommand (docs/cli.md)."""

import json
import re
import subprocess
import sys

import numpy as np

from lucid_megatron.data import ByteTokenizer, iter_shard_documents, read_manifest


def lucid(*args):
    return subprocess.run([sys.executable, "-m", "lucid_megatron", "data", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def counts_from_shards(manifest):
    """(documents, tokens, documents per shard) per split, by reading every shard."""
    result = {}
    for name, info in manifest.splits.items():
        per_shard = [list(iter_shard_documents(p)) for p in manifest.shard_paths(name)]
        docs = [d for shard in per_shard for d in shard]
        result[name] = (len(docs), sum(len(t) for t, _ in docs), [len(s) for s in per_shard])
    return result


def test_synth_command(tmp_path):
    out = tmp_path / "synth"
    result = lucid("synth", out, "--train-docs", 25, "--valid-docs", 6, "--min-len", 100, "--max-len", 140,
                   "--num-needles", 3, "--num-queries", 2, "--docs-per-shard", 10, "--seed", 4)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    counted = counts_from_shards(manifest)
    for name, info in manifest.splits.items():
        assert (info.documents, info.tokens, info.shard_documents) == counted[name]
        # The printed report carries the same numbers.
        assert re.search(rf"{name}\s+{len(info.shards)} shards\s+{info.documents} documents\s+{info.tokens} tokens",
                         result.stdout), result.stdout
    assert counted["train"][0] == 25 and counted["valid"][0] == 6 and counted["train"][2] == [10, 10, 5]
    assert manifest.has_answer_mask and manifest.tokenizer["name"] == "byte-v1"
    assert manifest.source["task"]["num_queries"] == 2 and manifest.source["seed"] == 4
    for tokens, mask in iter_shard_documents(manifest.shard_paths("train")[0]):
        assert 100 <= len(tokens) <= 140 and mask.sum() == 8  # two 4-digit answers

    again = lucid("synth", out)
    assert again.returncode == 2 and "not empty" in again.stderr and str(out) in again.stderr
    bad = lucid("synth", tmp_path / "bad", "--min-len", 10)
    assert bad.returncode == 2 and "min_len=10" in bad.stderr and not (tmp_path / "bad").exists()


def test_synth_mqar_command(tmp_path):
    out = tmp_path / "mqar"
    result = lucid("synth", out, "--task", "mqar", "--min-pairs", 2, "--max-pairs", 5, "--key-vocab", 10,
                   "--value-vocab", 20, "--updates", 3, "--train-docs", 30, "--valid-docs", 4, "--seed", 2)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.source["kind"] == "mqar" and manifest.has_answer_mask
    assert manifest.source["task"] == {"min_pairs": 2, "max_pairs": 5, "key_vocab": 10, "value_vocab": 20, "updates": 3}
    for tokens, mask in iter_shard_documents(manifest.shard_paths("train")[0]):
        answers = tokens[mask == 1]
        assert 2 <= len(answers) <= 5 and ((10 <= answers) & (answers < 30)).all()  # one value per key
    refused = lucid("synth", tmp_path / "bad", "--task", "mqar", "--template", "compact")
    assert refused.returncode == 2 and "--task mqar does not take --template" in refused.stderr
    too_wide = lucid("synth", tmp_path / "bad", "--task", "mqar", "--key-vocab", 200, "--value-vocab", 100)
    assert too_wide.returncode == 2 and "key_vocab + value_vocab = 300" in too_wide.stderr
    assert not (tmp_path / "bad").exists()


def test_prepare_command(tmp_path):
    texts = [f"document number {i} " + "words " * i for i in range(40)]
    (tmp_path / "a.txt").write_text("a whole file is one document\nwith two lines\n")
    (tmp_path / "empty.txt").write_text("  \n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"body": text, "id": i}) + "\n")
        f.write(json.dumps({"body": ""}) + "\n\n")
    out = tmp_path / "prepared"
    result = lucid("prepare", tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "b.jsonl", "--out", out,
                   "--text-key", "body", "--valid-fraction", 0.25, "--docs-per-shard", 8, "--seed", 1)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    counted = counts_from_shards(manifest)
    for name, info in manifest.splits.items():
        assert (info.documents, info.tokens, info.shard_documents) == counted[name]
    assert not manifest.has_answer_mask
    assert manifest.source["empty_documents_skipped"] == 2 and manifest.source["documents_read"] == 43
    # Every non-empty document appears once, as BOS + UTF-8 bytes + EOS, in one split or the other.
    tok = ByteTokenizer()
    expected = sorted(["a whole file is one document\nwith two lines\n"] + texts)
    found = sorted(tok.decode(t) for name in manifest.splits for p in manifest.shard_paths(name)
                   for t, _ in iter_shard_documents(p))
    assert found == expected
    first, *_ = iter_shard_documents(manifest.shard_paths("train")[0])
    assert first[0][0] == tok.bos_id and first[0][-1] == tok.eos_id and first[1] is None
    assert 0 < counted["valid"][0] < 20  # about a quarter of 41
    # Same inputs and seed -> the same split; another seed -> another split.
    same = lucid("prepare", tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "b.jsonl", "--out",
                 tmp_path / "same", "--text-key", "body", "--valid-fraction", 0.25, "--docs-per-shard", 8, "--seed", 1)
    assert same.returncode == 0
    for shard in manifest.splits["valid"].shards:
        assert (out / shard).read_bytes() == (tmp_path / "same" / shard).read_bytes()


def test_prepare_reports_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"title": "no text"}) + "\n")
    result = lucid("prepare", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and f"{path}:2: no 'text' field" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind
    path.write_text("{broken\n")
    result = lucid("prepare", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and f"{path}:1: not a JSON value" in result.stderr
    result = lucid("prepare", tmp_path / "notes.md", "--out", tmp_path / "out")
    assert result.returncode == 2 and "notes.md" in result.stderr and ".txt, .jsonl" in result.stderr


def test_prepare_with_hf_tokenizer(tmp_path):
    from .common import build_hf_tokenizer

    tok_dir = build_hf_tokenizer(tmp_path / "tok")
    (tmp_path / "a.txt").write_text("hello world the quick brown fox")
    out = tmp_path / "out"
    result = lucid("prepare", tmp_path / "a.txt", "--out", out, "--tokenizer", tok_dir, "--valid-fraction", 0)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    assert manifest.tokenizer["name"] == "hf:tok" and manifest.tokenizer["path"] == str(tok_dir.resolve())
    (tokens, _), = iter_shard_documents(manifest.shard_paths("train")[0])
    from lucid_megatron.data import tokenizer_from_manifest

    tok = tokenizer_from_manifest(manifest)
    assert tok.decode(tokens) == "hello world the quick brown fox" and tokens[0] == tokens[-1] == tok.eos_id
    assert np.all(tokens < tok.vocab_size)


def test_prepare_says_what_an_input_is_when_it_is_no_file(tmp_path):
    """An input that exists but is not a readable file is named for what it is, not as missing."""
    import os

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text")
    os.mkfifo(corpus / "stream.jsonl")
    result = lucid("prepare", corpus, "--out", tmp_path / "out")
    assert result.returncode == 2 and "stream.jsonl' is a FIFO, not a regular file" in result.stderr, result.stderr
    assert "does not exist" not in result.stderr and not (tmp_path / "out").exists()
    result = lucid("prepare", tmp_path / "missing.txt", "--out", tmp_path / "out")
    assert result.returncode == 2 and "missing.txt' does not exist" in result.stderr, result.stderr
