"""Shards and manifests: round trips, atomic writes, and clear errors for bad files."""

import io
import json
import tarfile
import warnings

import numpy as np
import pytest

from lucid_megatron.data import (
    ByteTokenizer, ShardError, ShardWriter, iter_shard_documents, read_manifest, write_manifest,
)

from .common import write_documents


def _random_documents(count, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 259, size=int(rng.integers(1, 300))).astype(np.int32) for _ in range(count)]
    masks = [(rng.random(len(d)) < 0.2).astype(np.uint8) for d in docs]
    return docs, masks


def test_round_trip_with_masks(tmp_path):
    docs, masks = _random_documents(11)
    info = write_documents(tmp_path, docs, masks, docs_per_shard=4)
    assert info.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert (info.documents, info.tokens, info.shard_documents) == (11, sum(map(len, docs)), [4, 4, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + info.shards  # no temp files left
    read = [d for shard in info.shards for d in iter_shard_documents(tmp_path / shard)]
    assert len(read) == 11
    for (tokens, mask), doc, expected in zip(read, docs, masks):
        assert tokens.dtype == np.int32 and mask.dtype == np.uint8
        np.testing.assert_array_equal(tokens, doc)
        np.testing.assert_array_equal(mask, expected)
    # Members as the format says: key = document index within the split.
    with tarfile.open(tmp_path / info.shards[1]) as tar:
        assert tar.getnames() == [f"{i:09d}.{m}" for i in range(4, 8) for m in ("mask.npy", "tokens.npy")]
    # Resuming inside a shard skips documents without changing the rest.
    skipped = list(iter_shard_documents(tmp_path / info.shards[1], start=3))
    assert len(skipped) == 1 and (skipped[0][0] == docs[7]).all()


def test_round_trip_without_masks_and_manifest(tmp_path):
    docs, _ = _random_documents(5, seed=1)
    write_documents(tmp_path, docs, docs_per_shard=10)
    manifest = read_manifest(tmp_path)
    assert manifest.dir == tmp_path.resolve() and not manifest.has_answer_mask
    assert manifest.tokenizer == ByteTokenizer().manifest_entry() and manifest.source == {"test": True}
    split = manifest.split("train")
    assert (split.shards, split.documents, split.tokens) == (["train-000000.tar"], 5, sum(map(len, docs)))
    read = list(iter_shard_documents(manifest.shard_paths("train")[0]))
    assert all(mask is None and (t == d).all() for (t, mask), d in zip(read, docs))
    with pytest.raises(ValueError, match="no split 'valid'"):
        manifest.split("valid")


def test_writer_validates_documents(tmp_path):
    with ShardWriter(tmp_path, "train", 2) as writer:
        with pytest.raises(ValueError, match="non-empty 1-D integer"):
            writer.add(np.array([], dtype=np.int32))
        with pytest.raises(ValueError, match="non-empty 1-D integer"):
            writer.add(np.array([1.5, 2.0]))
        with pytest.raises(ValueError, match=r"shape \(2,\); the document has 3"):
            writer.add([1, 2, 3], [0, 1])
        with pytest.raises(ValueError, match=r"0 or 1, got \[0, 2\]"):
            writer.add([1, 2, 3], [0, 2, 0])
        writer.add([1, 2, 3], [0, 1, 1])
        with pytest.raises(ValueError, match="every document has an answer mask or none"):
            writer.add([1, 2, 3])
    with pytest.raises(ValueError, match="split name 'Train/x'"):
        ShardWriter(tmp_path, "Train/x", 2)


def test_failed_write_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", 2) as writer:
            for doc in ([1, 2], [3], [4, 5]):
                writer.add(doc)
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]  # the finished shard only


def test_missing_and_malformed_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.*lucid data synth"):
        read_manifest(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="manifest.json.*lucid data prepare"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(tmp_path)
    write_documents(tmp_path / "ok", [[1, 2, 3]])
    good = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    for broken, message in [
        ({"format": "other"}, "format must be 'lucid-shards-v1'"),
        ({"has_answer_mask": "yes"}, "has_answer_mask"),
        ({"splits": {"train": {"shards": ["../x.tar"], "documents": 1, "tokens": 3}}}, "splits.train.shards"),
        ({"splits": {"train": {"shards": [], "documents": -1, "tokens": 3}}}, "splits.train.documents"),
        ({"tokenizer": {"name": "byte-v1"}}, "'tokenizer' must be an object with keys"),
    ]:
        (tmp_path / "manifest.json").write_text(json.dumps({**good, **broken}))
        with pytest.raises(ValueError, match=f"{tmp_path / 'manifest.json'}: malformed manifest: .*{message}"):
            read_manifest(tmp_path)


def test_manifest_is_written_atomically(tmp_path):
    write_manifest(tmp_path, ByteTokenizer(), False, {}, {"n": 1})
    write_manifest(tmp_path, ByteTokenizer(), False, {}, {"n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert read_manifest(tmp_path).source == {"n": 2}


@pytest.fixture
def shard(tmp_path):
    docs, masks = _random_documents(6, seed=2)
    write_documents(tmp_path, docs, masks, docs_per_shard=6)
    return tmp_path / "train-000000.tar", docs


def _cut(path, size):
    data = path.read_bytes()
    path.write_bytes(data[:size])


def test_missing_shard_names_the_file(tmp_path):
    missing = tmp_path / "train-000123.tar"
    with pytest.raises(ShardError, match="train-000123.tar") as err:
        list(iter_shard_documents(missing))
    assert isinstance(err.value, IOError)


def test_truncated_shard_names_the_file(shard):
    path, docs = shard
    with tarfile.open(path) as tar:
        third = tar.getmembers()[4]  # tokens.npy of document 2... cut inside its data
    _cut(path, third.offset_data + 10)
    read = []
    with pytest.raises(ShardError, match=f"{path}.*(corrupt|truncated)"):
        for tokens, _ in iter_shard_documents(path):
            read.append(tokens)
    # A document is released once the next one's header is read: only a prefix comes out.
    assert 1 <= len(read) < 3 and all((t == d).all() for t, d in zip(read, docs))


def test_shard_cut_at_a_document_boundary_is_caught_by_the_count(shard):
    path, _ = shard
    with tarfile.open(path) as tar:
        fourth = tar.getmembers()[6]  # first member of document 3
    _cut(path, fourth.offset)  # a valid-looking tar of 3 documents
    assert len(list(iter_shard_documents(path))) == 3
    with pytest.raises(ShardError, match=f"{path} holds 3 documents but the manifest says 6"):
        list(iter_shard_documents(path, expected_documents=6))


def test_corrupt_header_and_skip_mode(shard):
    path, docs = shard
    with tarfile.open(path) as tar:
        header = tar.getmembers()[6].offset
    data = bytearray(path.read_bytes())
    data[header : header + 20] = b"\xff" * 20  # breaks the header checksum of document 3
    path.write_bytes(bytes(data))
    # Tar treats a bad header after the first as the end of the archive; the manifest's count catches it.
    with pytest.raises(ShardError, match=f"{path} holds 3 documents but the manifest says 6"):
        list(iter_shard_documents(path, expected_documents=6))
    with pytest.warns(UserWarning, match=f"skipping the rest of a bad shard.*{path}"):
        read = list(iter_shard_documents(path, on_bad_shard="skip", expected_documents=6))
    assert [len(t) for t, _ in read] == [len(d) for d in docs[:3]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="on_bad_shard='ignore'"):
            list(iter_shard_documents(path, on_bad_shard="ignore"))


def test_corrupt_first_header(shard):
    path, _ = shard
    data = bytearray(path.read_bytes())
    data[100:108] = b"\xff" * 8  # inside the first header: its checksum no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{path} is corrupt or truncated"):
        list(iter_shard_documents(path))


def test_garbage_npy_member(tmp_path):
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("000000000.tokens.npy")
        payload = b"not an npy file"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ShardError, match=f"{path}: document 000000000: tokens.npy is not a valid .npy"):
        list(iter_shard_documents(path))
