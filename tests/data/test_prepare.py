"""``lucid data prepare``: every input format, the same bytes for any worker count and finish order, resume
after SIGKILL, and one-line errors for bad input that leave nothing behind (docs/data.md)."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lucid_megatron.data import iter_shard_documents, load_tokenizer, read_manifest
from lucid_megatron.data.prepare import _prepare, init_worker, is_valid_document, prepare_dataset, tokenize_part
from lucid_megatron.data.readers import JsonLines, expand_inputs, plan_parts

from .conftest import synthetic_documents


def write_corpus(root: Path, texts: list[str]) -> list[str]:
    """``texts`` spread over every format, in input order; returns the inputs (a directory, files, a glob)."""
    chunks = [texts[0:2], texts[2:20], texts[20:35], texts[35:50], texts[50:]]
    (root / "txt" / "sub").mkdir(parents=True)
    (root / "txt" / "a.txt").write_text(chunks[0][0], encoding="utf-8")
    (root / "txt" / "sub" / "b.txt").write_text(chunks[0][1], encoding="utf-8")
    (root / "txt" / ".hidden.txt").write_text("not an input")

    def jsonl(items) -> bytes:
        return b"".join(json.dumps({"text": t, "id": i}).encode() + b"\n" for i, t in enumerate(items))

    (root / "c.jsonl").write_bytes(jsonl(chunks[1][:5]) + b"\n   \n" + jsonl(chunks[1][5:]))  # blank lines
    half = len(chunks[2]) // 2  # two gzip members, two zstd frames: both concatenations are read on
    (root / "d.jsonl.gz").write_bytes(gzip.compress(jsonl(chunks[2][:half])) + gzip.compress(jsonl(chunks[2][half:])))
    zstd = zstandard.ZstdCompressor()
    (root / "e.jsonl.zst").write_bytes(zstd.compress(jsonl(chunks[3][:half])) + zstd.compress(jsonl(chunks[3][half:])))
    pq.write_table(pa.table({"id": list(range(len(chunks[4]))), "text": chunks[4]}), root / "f.parquet",
                   row_group_size=7)
    return [str(root / "txt"), str(root / "c.jsonl"), str(root / "*.jsonl.*"), str(root / "f.parquet")]


def corpus_texts(count: int = 80) -> list[str]:
    texts = synthetic_documents(count, seed=7, words=60)
    texts[3], texts[25] = "", "  \n "  # empty documents: counted, skipped
    texts[40] = "ünïcödé ✓ and emoji 🚀 in a document"
    return texts


def reference(texts: list[str], tokenizer, *, seed: int, valid_fraction: float) -> dict[str, list[list[int]]]:
    """The documents each split must hold: one text at a time, as the original single-process prepare did."""
    splits = {"train": [], "valid": []}
    for index, text in enumerate(texts):
        ids = tokenizer.encode(text) if text.strip() else []
        if ids:
            split = "valid" if is_valid_document(index, seed, valid_fraction) else "train"
            splits[split].append([tokenizer.bos_id, *ids, tokenizer.eos_id])
    return splits


def read_splits(out: Path) -> dict[str, list[list[int]]]:
    manifest = read_manifest(out)
    return {name: [tokens.tolist() for path in manifest.shard_paths(name) for tokens, _ in iter_shard_documents(path)]
            for name in manifest.splits}


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare"


def test_every_format_any_worker_count_same_bytes(tmp_path, bpe_tokenizer_dir):
    texts = corpus_texts()
    inputs = write_corpus(tmp_path, texts)
    options = dict(tokenizer=str(bpe_tokenizer_dir), valid_fraction=0.2, docs_per_shard=9, seed=3)
    one = prepare_dataset(inputs, tmp_path / "one", workers=1, **options)
    three = prepare_dataset(inputs, tmp_path / "three", workers=3, part_bytes=1500, **options)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "three")
    assert not staging_of(tmp_path / "one").exists() and not staging_of(tmp_path / "three").exists()

    tokenizer = load_tokenizer(str(bpe_tokenizer_dir))
    assert read_splits(tmp_path / "one") == reference(texts, tokenizer, seed=3, valid_fraction=0.2)
    assert one.source["documents_read"] == len(texts) and one.source["empty_documents_skipped"] == 2
    assert [Path(p).name for p in one.source["inputs"]] == ["a.txt", "b.txt", "c.jsonl", "d.jsonl.gz", "e.jsonl.zst",
                                                            "f.parquet"]
    assert three.splits["valid"].documents > 0 and three.tokenizer["name"] == "hf:bpe16k"


class ShuffledExecutor(Executor):
    """Runs the submitted calls on one thread, always picking a random waiting one: parts finish out of order."""

    def __init__(self, seed: int):
        self.rng, self.waiting, self.finished = random.Random(seed), [], []
        self.changed = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        with self.changed:
            self.waiting.append((future, fn, args))
            self.changed.notify()
        return future

    def _run(self):
        while True:
            with self.changed:
                while not self.waiting and not self.closed:
                    self.changed.wait()
                if not self.waiting:
                    return
                self.changed.wait(0.002)  # let more parts queue up, so there is a choice
                future, fn, args = self.waiting.pop(self.rng.randrange(len(self.waiting)))
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                    if fn is tokenize_part:
                        self.finished.append(args[0].index)
                except BaseException as err:
                    future.set_exception(err)

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self.changed:
            self.closed = True
            if cancel_futures:
                for future, _, _ in self.waiting:
                    future.cancel()
                self.waiting.clear()
            self.changed.notify()
        if wait:
            self.thread.join()


def test_finish_order_and_part_size_do_not_change_the_output(tmp_path):
    texts = synthetic_documents(60, seed=11, words=40)
    inputs = write_corpus(tmp_path, texts)
    options = dict(tokenizer="byte", valid_fraction=0.3, docs_per_shard=5, text_key="text", seed=0, add_bos=True,
                   add_eos=True)
    executors = []

    def shuffled(workers, init_args):
        init_worker(*init_args)
        executors.append(ShuffledExecutor(seed=len(executors)))
        return executors[-1]

    prepare_dataset(inputs, tmp_path / "pool", workers=2, **options)
    _prepare(inputs, tmp_path / "shuffled", workers=4, part_bytes=700, make_executor=shuffled, **options)
    finished = executors[0].finished
    assert len(finished) > 10 and finished != sorted(finished)  # the parts really finished out of order
    assert tree_bytes(tmp_path / "pool") == tree_bytes(tmp_path / "shuffled")
    assert read_splits(tmp_path / "pool") == reference(texts, load_tokenizer("byte"), seed=0, valid_fraction=0.3)


def test_a_large_jsonl_is_cut_into_parts_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": "x" * random.Random(i).randint(10, 300)}) for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    parts = list(plan_parts([path], "text", 2000))
    assert len(parts) > 20 and all(isinstance(p.source, JsonLines) for p in parts)
    assert all(sum(len(line) + 1 for line in p.source.lines[:-1]) < 2000 for p in parts)  # <= one line over
    assert [line.decode() for p in parts for line in p.source.lines] == lines
    assert [p.source.first_line for p in parts][:2] == [1, len(parts[0].source.lines) + 1]
    assert sum(p.input_bytes for p in parts) == path.stat().st_size


def test_inputs_expand_in_order(tmp_path):
    inputs = write_corpus(tmp_path, corpus_texts())
    names = [p.name for p in expand_inputs(inputs)]
    assert names == ["a.txt", "b.txt", "c.jsonl", "d.jsonl.gz", "e.jsonl.zst", "f.parquet"]


def lucid_prepare(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "lucid_megatron", "data", "prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_resume_after_sigkill(tmp_path, bpe_tokenizer_dir):
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for text in synthetic_documents(4000, seed=5, words=120):
            f.write(json.dumps({"text": text}) + "\n")
    out = tmp_path / "out"
    args = [corpus, "--out", out, "--tokenizer", bpe_tokenizer_dir, "--workers", 2, "--part-mb", 0.02,
            "--valid-fraction", 0.1]
    command = [sys.executable, "-m", "lucid_megatron", "data", "prepare", *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    parts = staging_of(out) / "parts"
    try:
        deadline = time.monotonic() + 60
        while len(list(parts.glob("*.docs"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "prepare ended before it could be killed: " + proc.stderr.read().decode()
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the main process, its forkserver and workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()  # nothing published
    finished = len(list(parts.glob("*.docs")))
    assert finished >= 3

    rerun = lucid_prepare(*args)
    assert rerun.returncode == 0, rerun.stderr
    reused = int(re.search(r"\((\d+) reused\)", rerun.stderr).group(1))
    assert "continuing from the finished parts" in rerun.stderr and reused >= finished
    assert not staging_of(out).exists()
    clean = prepare_dataset([corpus], tmp_path / "clean", tokenizer=str(bpe_tokenizer_dir), workers=1,
                            valid_fraction=0.1)
    assert clean.source["documents_read"] == 4000
    assert tree_bytes(out) == tree_bytes(tmp_path / "clean")


def test_parts_made_differently_are_not_reused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text " * 20)
    out = tmp_path / "out"
    stale = staging_of(out) / "parts"
    stale.mkdir(parents=True)
    (staging_of(out) / "record.json").write_text('{"version": 1, "text_key": "other"}')
    np.asarray([3], dtype=np.int64).tofile(stale / "part-000000.docs")
    np.asarray([1, 2, 3], dtype=np.int32).tofile(stale / "part-000000.tokens")
    prepare_dataset([tmp_path / "a.txt"], out, tokenizer="byte", valid_fraction=0.0, workers=1)
    assert "made from other inputs or arguments; starting over" in capsys.readouterr().err
    assert read_splits(out)["train"] == [[256, *("some text " * 20).encode(), 257]]


def bad_inputs(root: Path, tokenizer_dir: Path):
    """(name, inputs, extra arguments, the message expected) for each kind of bad input."""
    root.mkdir()
    good = root / "good.jsonl"
    good.write_text(json.dumps({"text": "fine"}) + "\n")
    (root / "latin1.txt").write_bytes("ok: caf\xe9 ok".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(b'{"text": "a"}\n\n{"text": "caf\xe9"}\n')
    (root / "no_field.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (root / "not_string.jsonl").write_text('{"text": "a"}\n{"text": 12}\n')
    payload = b"".join(json.dumps({"text": f"line {i} " * 20}).encode() + b"\n" for i in range(300))
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(payload)[:300])
    (root / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload)[:300])
    broken = bytearray(gzip.compress(payload))
    broken[40:80] = b"\xff" * 40
    (root / "corrupt.jsonl.gz").write_bytes(bytes(broken))
    table = pa.table({"text": [f"row {i}" for i in range(40)]})
    pq.write_table(table, root / "whole.parquet", row_group_size=10)
    (root / "cut.parquet").write_bytes((root / "whole.parquet").read_bytes()[:-30])
    chunk = pq.ParquetFile(root / "whole.parquet").metadata.row_group(2).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    damaged = bytearray((root / "whole.parquet").read_bytes())
    damaged[start:start + 8] = b"\xff" * 8  # the page header of row group 2: its footer still reads
    (root / "damaged.parquet").write_bytes(bytes(damaged))
    pq.write_table(pa.table({"body": ["a"]}), root / "no_column.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), root / "int_column.parquet")
    pq.write_table(pa.table({"text": ["a", "b", "c", None]}), root / "null.parquet", row_group_size=2)
    (root / "empty_dir").mkdir()
    (root / "empty_dir" / "notes.md").write_text("no input here")
    broken_tokenizer = root / "broken_tokenizer"
    broken_tokenizer.mkdir()
    (broken_tokenizer / "tokenizer.json").write_text("{not json")
    (broken_tokenizer / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    return [
        ("txt not utf-8", [root / "latin1.txt"], {}, f"{root / 'latin1.txt'}: not UTF-8 text (invalid continuation "
                                                     "byte at byte offset 7)"),
        ("jsonl not utf-8", [good, root / "latin1.jsonl"], {}, f"{root / 'latin1.jsonl'}:3: not UTF-8 text"),
        ("missing field", [root / "no_field.jsonl"], {}, f"{root / 'no_field.jsonl'}:2: no 'text' field"),
        ("not a string", [root / "not_string.jsonl"], {}, f"{root / 'not_string.jsonl'}:2: field 'text' is int"),
        ("truncated gz", [root / "cut.jsonl.gz"], {}, f"{root / 'cut.jsonl.gz'}: truncated gzip stream: it ends at "
                                                      "byte 300"),
        ("truncated zst", [root / "cut.jsonl.zst"], {}, f"{root / 'cut.jsonl.zst'}: truncated zstd stream"),
        ("corrupt gz", [root / "corrupt.jsonl.gz"], {}, f"{root / 'corrupt.jsonl.gz'}: corrupt gzip stream near "
                                                        "compressed byte offset"),
        ("damaged parquet", [root / "cut.parquet"], {}, f"{root / 'cut.parquet'}: not a readable parquet file"),
        ("damaged row group", [root / "damaged.parquet"], {}, f"{root / 'damaged.parquet'}: row group 2: cannot "
                                                               "read it ("),
        ("no column", [root / "no_column.parquet"], {}, f"{root / 'no_column.parquet'}: no column 'text' "
                                                        "(columns: body;"),
        ("int column", [root / "int_column.parquet"], {}, f"{root / 'int_column.parquet'}: column 'text' has type "
                                                          "int64, expected a string column"),
        ("null text", [root / "null.parquet"], {}, f"{root / 'null.parquet'}: row group 1, row 1: 'text' is null"),
        ("empty input set", [], {}, "no inputs given"),
        ("glob matches nothing", [root / "*.json"], {}, f"input glob {str(root / '*.json')!r} matches nothing"),
        ("directory without inputs", [root / "empty_dir"], {}, f"input directory {str(root / 'empty_dir')!r} holds "
                                                               "no .txt"),
        ("tokenizer does not load", [good], {"tokenizer": str(broken_tokenizer)},
         f"tokenizer directory {str(broken_tokenizer)!r} does not load"),
        ("zero workers", [good], {"workers": 0}, "workers=0 is not allowed; allowed: an integer >= 1"),
    ]


def test_bad_input_is_one_line_naming_where_and_leaves_nothing(tmp_path, bpe_tokenizer_dir):
    for name, inputs, extra, expected in bad_inputs(tmp_path / "in", bpe_tokenizer_dir):
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        options = {"tokenizer": "byte", "workers": 1, "valid_fraction": 0.0, **extra}
        with pytest.raises((ValueError, OSError)) as caught:
            prepare_dataset(inputs, out, **options)
        message = str(caught.value)
        assert message.startswith(expected), (name, message)
        assert "\n" not in message, (name, message)
        assert not out.exists() and not staging_of(out).exists(), name


def test_bad_input_from_a_worker_through_the_command(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    result = lucid_prepare(path, "--out", tmp_path / "out", "--workers", 2)
    assert result.returncode == 2  # bad input
    assert result.stderr.strip().splitlines() == [f"lucid data prepare: error: {path}:2: not UTF-8 text "
                                                  "(invalid start byte at byte 10 of the line)"]
    assert not (tmp_path / "out").exists() and not staging_of(tmp_path / "out").exists()
    zero = lucid_prepare(path, "--out", tmp_path / "out", "--workers", 0)
    assert zero.returncode == 2 and "argument --workers: 0 is not allowed" in zero.stderr
