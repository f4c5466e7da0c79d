"""Shared builders for the data tests: tiny datasets and a tiny local Hugging Face tokenizer."""

from __future__ import annotations

import numpy as np

from lucid_megatron.data import ByteTokenizer, RetrievalTask, ShardWriter, write_manifest, write_synth_dataset

# Short documents (32..150 byte tokens) against 64-token rows: rows hold several documents, and
# documents longer than a row are cut into pieces.
SMALL_TASK = RetrievalTask(min_len=32, max_len=150, num_needles=1, num_queries=1, key_len=2, value_len=2)


def small_synth(path, *, train_docs=96, valid_docs=24, docs_per_shard=8, seed=0):
    return write_synth_dataset(path, SMALL_TASK, train_docs=train_docs, valid_docs=valid_docs,
                               docs_per_shard=docs_per_shard, seed=seed, tokenizer=ByteTokenizer())


def write_documents(path, documents, masks=None, docs_per_shard=4):
    """A one-split ("train") dataset holding exactly ``documents``."""
    path.mkdir(parents=True, exist_ok=True)
    with ShardWriter(path, "train", docs_per_shard) as writer:
        for i, doc in enumerate(documents):
            writer.add(np.asarray(doc, dtype=np.int32), None if masks is None else masks[i])
    write_manifest(path, ByteTokenizer(), masks is not None, {"train": writer.info}, {"test": True})
    return writer.info


def build_hf_tokenizer(directory, *, with_bos=False, with_pad=False):
    """Train a byte-level BPE on a few strings and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<eos>"] + ["<bos>"] * with_bos + ["<pad>"] * with_pad
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "the quick brown fox", "key AB is 12. what is AB? 12."] * 10, trainer)
    extra = {"bos_token": "<bos>"} if with_bos else {}
    extra.update({"pad_token": "<pad>"} if with_pad else {})
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", **extra).save_pretrained(directory)
    return directory


def reference_rows(docs, masks, seq_length, mode, pad):
    """The packing rules written out token by token.

    Returns ``(cells, segment lengths)`` per row, a cell being (token, label, weight, position).
    Documents longer than a row are first cut into row-sized pieces; then each piece goes into the
    current row if it fits, else the row is padded out and the piece starts a new one.
    """
    pieces = []
    for doc, mask in zip(docs, masks):
        for start in range(0, len(doc), seq_length):
            pieces.append((doc[start : start + seq_length], mask[start : start + seq_length]))
    rows, row, segments = [], [], []

    def close():
        if row:
            pad_len = seq_length - len(row)
            for i in range(pad_len):
                row.append((pad, pad, 0.0, i))
            rows.append((row[:], segments[:] + ([pad_len] if pad_len else [])))
            row.clear()
            segments.clear()

    for tokens, mask in pieces:
        if len(row) + len(tokens) > seq_length:
            close()
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            label = pad if last else tokens[i + 1]
            weight = 0.0 if last else (1.0 if mode == "all" else float(mask[i + 1]))
            row.append((token, label, weight, i))
        segments.append(len(tokens))
    close()
    return rows
