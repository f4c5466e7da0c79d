"""Data: tokenizers, token shards and manifests, synthetic retrieval data, packing and loaders."""

from .loader import MicroBatch, TrainRows, check_stream_layout, make_eval_loader, make_train_loader
from .packing import PackedRow, RowPacker
from .prepare import prepare_dataset
from .shards import (
    Manifest, ShardError, ShardWriter, SplitInfo, iter_shard_documents, read_manifest, write_manifest,
)
from .synth import RetrievalTask, generate_retrieval_document, write_synth_dataset
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_from_manifest

__all__ = [
    "ByteTokenizer", "HFTokenizer", "Manifest", "MicroBatch", "PackedRow", "RetrievalTask", "RowPacker",
    "ShardError", "ShardWriter", "SplitInfo", "TrainRows", "check_stream_layout", "generate_retrieval_document",
    "iter_shard_documents", "load_tokenizer", "make_eval_loader", "make_train_loader", "prepare_dataset",
    "read_manifest", "tokenizer_from_manifest", "write_manifest", "write_synth_dataset",
]
