"""Byte tokenizer round trips and a local Hugging Face tokenizer loaded by path (no network)."""

import pytest
from tokenizers import Tokenizer

from lucid_megatron.data import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_manifest
from lucid_megatron.data.tokenizer import tokenizer_mismatch

from .common import build_hf_tokenizer


def test_byte_tokenizer_round_trip_and_ids():
    tok = load_tokenizer("byte")
    text = "héllo, wörld — ✓ 123"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # ids are the UTF-8 bytes, nothing added
    assert tok.decode(ids) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tok.name) == (256, 257, 258, 259, "byte-v1")


def test_byte_decode_skips_specials_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("aé") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "aé"
    cut = tok.encode("é")[:1]  # half of a two-byte character
    assert tok.decode(tok.encode("a") + cut) == "a\ufffd"
    with pytest.raises(ValueError, match="259"):
        tok.decode([259])


def test_unknown_tokenizer_spec_is_refused(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope.*'byte'"):
        load_tokenizer(missing)


def test_hf_tokenizer_from_local_directory(tmp_path):
    directory = build_hf_tokenizer(tmp_path / "tiny-bpe")
    tok = load_tokenizer(str(directory))
    assert isinstance(tok, HFTokenizer)
    assert tok.name == "hf:tiny-bpe" and tok.path == str(directory.resolve())
    # No BOS and no PAD in this tokenizer: both fall back to EOS.
    assert tok.eos_id == tok._tok.convert_tokens_to_ids("<eos>")
    assert tok.bos_id == tok.eos_id == tok.pad_id
    saved = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert tok.vocab_size == saved.get_vocab_size(with_added_tokens=True) > 256
    text = "hello world, the quick brown fox ü"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and len(ids) < len(text.encode("utf-8"))  # merges learned, no specials added
    assert tok.decode(ids + [tok.eos_id]) == text


def test_hf_tokenizer_with_own_bos_and_pad(tmp_path):
    tok = load_tokenizer(str(build_hf_tokenizer(tmp_path / "t", with_bos=True, with_pad=True)))
    ids = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(ids) == 3
    assert tok._tok.convert_ids_to_tokens([tok.bos_id, tok.pad_id]) == ["<bos>", "<pad>"]


def test_tokenizer_from_manifest_entry(tmp_path):
    assert isinstance(tokenizer_from_manifest(ByteTokenizer().manifest_entry()), ByteTokenizer)
    tok = load_tokenizer(str(build_hf_tokenizer(tmp_path / "t")))
    again = tokenizer_from_manifest(tok.manifest_entry())
    assert again.encode("hello fox") == tok.encode("hello fox")
    changed = dict(tok.manifest_entry(), vocab_size=301)
    with pytest.raises(ValueError, match="vocab_size=301"):
        tokenizer_from_manifest(changed)
    moved = dict(tok.manifest_entry(), path=str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="gone"):
        tokenizer_from_manifest(moved)


def test_tokenizer_mismatch_names_both_records(tmp_path):
    byte = ByteTokenizer().manifest_entry()
    bpe = load_tokenizer(str(build_hf_tokenizer(tmp_path / "t"))).manifest_entry()
    problem = tokenizer_mismatch(byte, bpe, a_is="the checkpoint was trained with", b_is="the dataset D was made with")
    assert problem == (
        f"tokenizers differ (kind byte vs hf, name byte-v1 vs hf:t, vocabulary 259 vs {bpe['vocab_size']}, "
        f"bos 256 vs {bpe['bos_id']}, eos 257 vs {bpe['eos_id']}, pad 258 vs {bpe['pad_id']}): the checkpoint was "
        f"trained with byte-v1 (vocabulary 259, bos 256, eos 257, pad 258); the dataset D was made with hf:t "
        f"(vocabulary {bpe['vocab_size']}, bos {bpe['bos_id']}, eos {bpe['eos_id']}, pad {bpe['pad_id']})")
    # the same tokenizer elsewhere (a copied directory) agrees; one changed special id does not
    assert tokenizer_mismatch(bpe, dict(bpe, path="/elsewhere/t"), a_is="a", b_is="b") is None
    changed = tokenizer_mismatch(byte, dict(byte, eos_id=0), a_is="a", b_is="b")
    assert changed.startswith("tokenizers differ (eos 257 vs 0): a byte-v1")
