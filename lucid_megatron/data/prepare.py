"""Tokenize real text (.txt files, .jsonl lines) into train/valid token shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lucid_megatron.atomic import require_empty_output, staged_directory
from .shards import ShardWriter, read_manifest, write_manifest
from .tokenizer import load_tokenizer

INPUT_SUFFIXES = (".txt", ".jsonl")


def is_valid_document(index: int, seed: int, valid_fraction: float) -> bool:
    """Deterministic split assignment: a stable hash of (seed, document index), not Python's ``hash``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < valid_fraction


def _read_documents(path: Path, text_key: str):
    """Yield the texts of one input file: a .txt is one document, a .jsonl one per non-blank line."""
    if path.suffix == ".txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        return
    with open(path, encoding="utf-8") as f:
        line_number = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{line_number + 1}: not UTF-8 text ({err})") from err
            if not line:
                return
            line_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: not a JSON value ({err.msg})") from err
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(f"{path}:{line_number}: no {text_key!r} field (set the field name with text_key)")
            if not isinstance(record[text_key], str):
                raise ValueError(f"{path}:{line_number}: field {text_key!r} is {type(record[text_key]).__name__}, "
                                 "expected a string")
            yield record[text_key]


def prepare_dataset(inputs, out_dir, *, tokenizer, valid_fraction: float = 0.01, docs_per_shard: int = 1000,
                    text_key: str = "text", seed: int = 0, add_bos: bool = True, add_eos: bool = True):
    """Tokenize ``inputs`` into ``out_dir`` (train and valid splits, no answer mask); returns the Manifest.

    Documents whose text is empty or only whitespace (or encodes to no tokens) are skipped and counted in ``source``.
    ``out_dir`` must be absent or empty; it appears only once everything is written.
    """
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r} is not allowed; allowed: 0 <= valid_fraction < 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given; pass .txt or .jsonl files")
    for path in paths:
        if path.suffix not in INPUT_SUFFIXES:
            raise ValueError(f"input {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(INPUT_SUFFIXES)}")
        if not path.is_file():
            raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    require_empty_output(out_dir)

    index = skipped = 0
    with staged_directory(out_dir) as staging:
        with ShardWriter(staging, "train", docs_per_shard) as train, \
                ShardWriter(staging, "valid", docs_per_shard) as valid:
            for path in paths:
                for text in _read_documents(path, text_key):
                    tokens = tokenizer.encode(text) if text.strip() else []
                    if tokens:
                        tokens = [tokenizer.bos_id] * add_bos + tokens + [tokenizer.eos_id] * add_eos
                        (valid if is_valid_document(index, seed, valid_fraction) else train).add(tokens)
                    else:
                        skipped += 1
                    index += 1
        if train.info.documents == 0:
            raise ValueError(f"no train documents: {index} read, {skipped} empty, "
                             f"{valid.info.documents} assigned to valid (valid_fraction={valid_fraction})")
        source = {"command": "lucid data prepare", "inputs": [str(p.resolve()) for p in paths],
                  "text_key": text_key, "valid_fraction": valid_fraction, "seed": seed, "add_bos": add_bos,
                  "add_eos": add_eos, "documents_read": index, "empty_documents_skipped": skipped}
        write_manifest(staging, tokenizer, False, {"train": train.info, "valid": valid.info}, source)
    return read_manifest(out_dir)
