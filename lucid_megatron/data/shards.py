"""Token shards (webdataset tars) and the manifest that describes a dataset directory.

Layout: ``DIR/manifest.json`` plus ``DIR/<split>-000000.tar, ...``. One sample per document, keyed
by its index within the split (``%09d``), with ``tokens.npy`` (int32) and, for datasets with answer
masks, ``mask.npy`` (uint8, 1 = answer token). See docs/data.md.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from lucid_megatron.atomic import write_text as atomic_write_text

FORMAT = "lucid-shards-v1"
MANIFEST = "manifest.json"
HOW_TO_MAKE = "make one with `lucid data synth DIR` or `lucid data prepare INPUT... --out DIR`"
_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_]*")
_TOKENIZER_KEYS = ("name", "kind", "vocab_size", "bos_id", "eos_id", "pad_id", "path")


class ShardError(IOError):
    """A shard is missing or unreadable; the message names the file."""


@dataclass
class SplitInfo:
    shards: list[str]
    documents: int
    tokens: int
    # Documents per shard, in shard order: lets readers notice a tar cut at a member boundary,
    # which tar itself cannot tell from a complete file.
    shard_documents: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    dir: Path
    tokenizer: dict
    has_answer_mask: bool
    splits: dict[str, SplitInfo]
    source: dict = field(default_factory=dict)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"dataset {str(self.dir)!r} has no split {name!r}; it has: {', '.join(self.splits)}")
        return self.splits[name]

    def shard_paths(self, name: str) -> list[Path]:
        return [self.dir / shard for shard in self.split(name).shards]


# ----------------------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _as_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"a document must be a non-empty 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max:
        raise ValueError(f"token ids must lie in 0..2**31-1, got {tokens.min()}..{tokens.max()}")
    return tokens.astype(np.int32)


def _as_mask(mask, length: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != (length,):
        raise ValueError(f"answer mask has shape {mask.shape}; the document has {length} tokens")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"answer mask values must be 0 or 1, got {sorted(set(np.unique(mask).tolist()))}")
    return mask.astype(np.uint8)


class ShardWriter:
    """Write one split's documents into ``<split>-NNNNNN.tar`` shards of ``docs_per_shard`` each.

    Each shard is written under a temporary name and renamed once complete. ``close()`` (or leaving
    the ``with`` block) returns the split's SplitInfo, also kept as ``.info``.
    """

    def __init__(self, out_dir, split: str, docs_per_shard: int):
        if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
            raise ValueError(f"split name {split!r} is not allowed; use lowercase letters, digits and '_'")
        if isinstance(docs_per_shard, bool) or not isinstance(docs_per_shard, int) or docs_per_shard < 1:
            raise ValueError(f"docs_per_shard must be a positive integer, got {docs_per_shard!r}")
        self.out_dir, self.split, self.docs_per_shard = Path(out_dir), split, docs_per_shard
        self.info: SplitInfo | None = None
        self._shards: list[str] = []
        self._shard_documents: list[int] = []
        self._documents = self._tokens = 0
        self._has_mask: bool | None = None
        self._writer = self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def add(self, tokens, mask=None) -> None:
        tokens = _as_tokens(tokens)
        mask = _as_mask(mask, len(tokens))
        if self._has_mask is None:
            self._has_mask = mask is not None
        elif self._has_mask != (mask is not None):
            raise ValueError(f"split {self.split!r}: either every document has an answer mask or none does")
        if self._writer is None or self._shard_documents[-1] == self.docs_per_shard:
            self._finish_shard()
            self._open_shard()
        sample = {"__key__": f"{self._documents:09d}", "tokens.npy": _npy_bytes(tokens)}
        if mask is not None:
            sample["mask.npy"] = _npy_bytes(mask)
        self._writer.write(sample)
        self._shard_documents[-1] += 1
        self._documents += 1
        self._tokens += len(tokens)

    @property
    def has_answer_mask(self) -> bool | None:
        """None until the first document."""
        return self._has_mask

    def close(self) -> SplitInfo:
        if self.info is None:
            self._finish_shard()
            self.info = SplitInfo(list(self._shards), self._documents, self._tokens, list(self._shard_documents))
        return self.info

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self._shards):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        # mtime fixed so the same documents always give byte-identical shards.
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
        self._shards.append(name)
        self._shard_documents.append(0)

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            os.replace(self._tmp, self.out_dir / self._shards[-1])
            self._writer = self._tmp = None

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._tmp = None


def write_manifest(out_dir, tokenizer, has_answer_mask: bool, splits: dict, source: dict) -> Path:
    """Write ``manifest.json`` atomically. ``tokenizer`` is a tokenizer or its manifest dict;
    ``splits`` maps split name -> SplitInfo (or an equivalent dict)."""
    entry = tokenizer if isinstance(tokenizer, dict) else tokenizer.manifest_entry()
    body = {
        "format": FORMAT,
        "tokenizer": {key: entry.get(key) for key in _TOKENIZER_KEYS},
        "has_answer_mask": bool(has_answer_mask),
        "splits": {name: (info if isinstance(info, dict) else vars(info)) for name, info in splits.items()},
        "source": source,
    }
    path = Path(out_dir) / MANIFEST
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
    return path


# ----------------------------------------------------------------------------------------- reading


def read_manifest(dataset_dir) -> Manifest:
    directory = Path(dataset_dir)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory {str(directory)!r} does not exist; {HOW_TO_MAKE}")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist, so {str(directory)!r} is not a dataset; {HOW_TO_MAKE}")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err

    def check(ok, what):
        if not ok:
            raise ValueError(f"{path}: malformed manifest: {what}")

    check(isinstance(body, dict) and body.get("format") == FORMAT,
          f"format must be {FORMAT!r}, got {body.get('format') if isinstance(body, dict) else body!r}")
    tokenizer = body.get("tokenizer")
    check(isinstance(tokenizer, dict) and all(k in tokenizer for k in _TOKENIZER_KEYS),
          f"'tokenizer' must be an object with keys {', '.join(_TOKENIZER_KEYS)}")
    check(isinstance(body.get("has_answer_mask"), bool), "'has_answer_mask' must be true or false")
    check(isinstance(body.get("splits"), dict), "'splits' must be an object")
    splits = {}
    for name, raw in body["splits"].items():
        check(isinstance(raw, dict), f"splits.{name} must be an object")
        shards, counts = raw.get("shards"), raw.get("shard_documents", [])
        check(isinstance(shards, list) and all(isinstance(s, str) and s and os.path.basename(s) == s for s in shards),
              f"splits.{name}.shards must be a list of file names in the dataset directory")
        for key in ("documents", "tokens"):
            check(isinstance(raw.get(key), int) and raw[key] >= 0, f"splits.{name}.{key} must be an integer >= 0")
        check(isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts)
              and (not counts or (len(counts) == len(shards) and sum(counts) == raw["documents"])),
              f"splits.{name}.shard_documents must list one count per shard, summing to 'documents'")
        splits[name] = SplitInfo(shards, raw["documents"], raw["tokens"], counts)
    source = body.get("source") or {}
    return Manifest(directory.resolve(), tokenizer, body["has_answer_mask"], splits, source)


class _SkipFirstDocuments:
    """``select_files`` predicate for webdataset's tar iterator: drop the members of the first
    ``count`` documents without reading their data (resuming inside a shard stays cheap)."""

    def __init__(self, count: int):
        self.count, self.seen, self._last_key = count, 0, None

    def __call__(self, fname: str) -> bool:
        key = fname.split(".", 1)[0]
        if key != self._last_key:
            self._last_key, self.seen = key, self.seen + 1
        return self.seen > self.count


def _load_npy(path, key, member, data, dtype) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ShardError(f"shard {path}: document {key}: {member} is not a valid .npy ({err})") from err
    if array.ndim != 1 or array.dtype != dtype:
        raise ShardError(f"shard {path}: document {key}: {member} must be 1-D {np.dtype(dtype)}, "
                         f"got shape {array.shape} {array.dtype}")
    return array


def _documents(path: Path, start: int, expected: int | None, vocab_size: int | None):
    try:
        stream = open(path, "rb")
    except OSError as err:
        raise ShardError(f"cannot open shard {path}: {err.strerror or err}") from err
    skipper = _SkipFirstDocuments(start)
    has_mask = None

    def decode(key, members):
        nonlocal has_mask
        if "tokens.npy" not in members:
            raise ShardError(f"shard {path}: document {key} has no tokens.npy")
        tokens = _load_npy(path, key, "tokens.npy", members["tokens.npy"], np.int32)
        if vocab_size is not None and len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
            raise ShardError(f"shard {path}: document {key}: token id {bad} is outside the tokenizer's "
                             f"vocabulary [0, {vocab_size})")
        mask = None
        if "mask.npy" in members:
            mask = _load_npy(path, key, "mask.npy", members["mask.npy"], np.uint8)
            if len(mask) != len(tokens):
                raise ShardError(f"shard {path}: document {key}: mask has {len(mask)} entries, tokens {len(tokens)}")
        if has_mask is None:
            has_mask = mask is not None
        elif has_mask != (mask is not None):
            raise ShardError(f"shard {path}: document {key}: answer mask present in some documents only")
        return tokens, mask

    with stream:
        key, members = None, {}
        try:
            for item in tar_file_iterator(stream, select_files=skipper):
                item_key, _, member = item["fname"].partition(".")
                if item_key != key and members:
                    yield decode(key, members)
                    members = {}
                key = item_key
                members[member] = item["data"]
            if members:
                yield decode(key, members)
        except ShardError:
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise ShardError(f"shard {path} is corrupt or truncated: {err}") from err
    if expected is not None and skipper.seen != expected:
        raise ShardError(f"shard {path} holds {skipper.seen} documents but the manifest says {expected} "
                         "(truncated at a document boundary?)")


def iter_shard_documents(path, *, on_bad_shard: str = "error", start: int = 0, expected_documents: int | None = None,
                         vocab_size: int | None = None):
    """Stream ``(tokens int32, mask uint8 | None)`` for each document of one shard.

    ``start`` skips that many leading documents; ``expected_documents`` (from the manifest) turns a
    short shard into an error; ``vocab_size`` (the manifest's tokenizer) turns an out-of-vocabulary
    token id into an error. A missing or corrupt shard raises ShardError naming the file, or with
    ``on_bad_shard="skip"`` warns and yields nothing more from it.
    """
    if on_bad_shard not in ("error", "skip"):
        raise ValueError(f"on_bad_shard={on_bad_shard!r} is not allowed; allowed: 'error', 'skip'")
    try:
        yield from _documents(Path(path), start, expected_documents, vocab_size)
    except ShardError as err:
        if on_bad_shard == "error":
            raise
        warnings.warn(f"skipping the rest of a bad shard: {err}", stacklevel=2)
