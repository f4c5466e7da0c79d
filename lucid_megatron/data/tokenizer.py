"""Tokenizers: an embedded byte-level one (no download) and local Hugging Face directories.

Both expose the same small surface the data pipeline and the trainer use: ``encode`` (no special
tokens added), ``decode`` (special tokens dropped), ``bos_id``, ``eos_id``, ``pad_id``,
``vocab_size``, ``name`` and ``manifest_entry()`` (what a dataset manifest records).
"""

from __future__ import annotations

import os
from pathlib import Path

ALLOWED_SPECS = "'byte' or the path of a local Hugging Face tokenizer directory"


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; three special ids follow them."""

    kind = "byte"
    name = "byte-v1"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    path = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.name}: token id {bad[0]} is outside 0..{self.vocab_size - 1}")
        # Bytes cut mid-character (e.g. by packing) decode to U+FFFD instead of failing.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def manifest_entry(self) -> dict:
        return _entry(self)

    def to_hf(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (for exported models).

        Byte-level pre-tokenisation without a regex split and a BPE model without merges give exactly one
        token per UTF-8 byte, with the byte's value as its id; ``<bos>`` is prepended like in training data.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        vocab = {char: byte for byte, char in _byte_level_alphabet().items()}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<bos>", "<eos>", "<pad>"]
        tok.add_special_tokens(specials)
        assert [tok.token_to_id(t) for t in specials] == [self.bos_id, self.eos_id, self.pad_id]
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", self.bos_id)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _byte_level_alphabet() -> dict[int, str]:
    """byte -> the printable character byte-level BPE uses for it (visible bytes stand for themselves,
    the others are shifted past 255), so every byte is one vocabulary entry."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in visible:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory only (never the network)."""

    kind = "hf"

    def __init__(self, directory):
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        self.path = str(directory.resolve())
        self.name = "hf:" + os.path.basename(self.path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {self.path!r} has no eos token; documents need one to mark their end")
        self.eos_id = int(self._tok.eos_token_id)
        # Many causal-LM tokenizers define neither BOS nor PAD; EOS is the usual stand-in for both.
        self.bos_id = self.eos_id if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        self.pad_id = self.eos_id if self._tok.pad_token_id is None else int(self._tok.pad_token_id)
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def manifest_entry(self) -> dict:
        return _entry(self)

    def to_hf(self):
        return self._tok


def _entry(tokenizer) -> dict:
    return {
        "name": tokenizer.name, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "path": tokenizer.path,
    }


def load_tokenizer(spec):
    """``"byte"`` -> ByteTokenizer; an existing directory -> HFTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec):
        return HFTokenizer(spec)
    raise ValueError(f"tokenizer {str(spec)!r} is neither 'byte' nor an existing directory; allowed: {ALLOWED_SPECS}")


def tokenizer_from_manifest(manifest):
    """The tokenizer a dataset was made with (a Manifest or its ``tokenizer`` dict).

    A Hugging Face tokenizer is reloaded from the recorded path and must still have the recorded
    vocabulary size and special ids, so that a changed directory is caught before training.
    """
    entry = manifest if isinstance(manifest, dict) else manifest.tokenizer
    kind = entry.get("kind")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "hf":
        if not entry.get("path") or not os.path.isdir(entry["path"]):
            raise FileNotFoundError(
                f"the dataset's tokenizer directory {entry.get('path')!r} does not exist on this machine; "
                "copy it there (the manifest records its absolute path)"
            )
        tokenizer = HFTokenizer(entry["path"])
    else:
        raise ValueError(f"manifest tokenizer kind {kind!r} is unknown; allowed: 'byte', 'hf'")
    current = tokenizer.manifest_entry()
    for key in ("name", "vocab_size", "bos_id", "eos_id", "pad_id"):
        if key in entry and entry[key] != current[key]:
            raise ValueError(
                f"tokenizer {current['name']!r} has {key}={current[key]!r} but the dataset was made with "
                f"{key}={entry[key]!r}; re-prepare the data or restore the original tokenizer"
            )
    return tokenizer


# What makes two tokenizer records the same tokenizer; the path is left out (a copied directory is the same one).
COMPARED_FIELDS = ("kind", "name", "vocab_size", "bos_id", "eos_id", "pad_id")
_FIELD_WORDS = {"kind": "kind", "name": "name", "vocab_size": "vocabulary", "bos_id": "bos", "eos_id": "eos",
                "pad_id": "pad"}


def describe_tokenizer(entry: dict) -> str:
    """A tokenizer record in words: ``byte-v1 (vocabulary 259, bos 256, eos 257, pad 258)``."""
    ids = ", ".join(f"{_FIELD_WORDS[key]} {entry.get(key)}" for key in ("vocab_size", "bos_id", "eos_id", "pad_id"))
    return f"{entry.get('name')} ({ids})"


def tokenizer_mismatch(a: dict, b: dict, *, a_is: str, b_is: str) -> str | None:
    """None when two tokenizer records (manifest entries) agree on kind, name, vocabulary size and special ids;
    else one line naming both, e.g. ``tokenizers differ (vocabulary 259 vs 16384): the checkpoint C was trained
    with byte-v1 (vocabulary 259, ...); the dataset D was made with hf:bpe16k (vocabulary 16384, ...)``, where
    ``a_is`` / ``b_is`` say whose each record is."""
    differences = [f"{_FIELD_WORDS[key]} {a.get(key)} vs {b.get(key)}"
                   for key in COMPARED_FIELDS if a.get(key) != b.get(key)]
    if not differences:
        return None
    return (f"tokenizers differ ({', '.join(differences)}): {a_is} {describe_tokenizer(a)}; "
            f"{b_is} {describe_tokenizer(b)}")
