"""Training loader throughput: tokens/s per rank from prepared shards, beside a bare read of the same tar files.

    python benchmarks/bench_loader.py [--tokens 33554432] [--seq-lengths 8192 131072] [--workers 0 2]
                                      [--dir DIR] [--mixture]

Writes a dataset once (documents of log-normal lengths, median 1024 tokens, capped at 262144; random ids of a
32000-token vocabulary; 16 shards), then times, over one pass of its tokens:

* ``bare read``: the tar files read in 4 MiB chunks (tokens/s = bytes / 4: the disk / page-cache bound);
* ``tar + npy``: ``iter_shard_documents`` over every shard (webdataset's tar iterator and ``np.load``);
* ``loader``: ``make_train_loader`` at each row length and loader-worker count (one rank reading all 8 streams,
  micro-batches of one row; tokens counted as row positions, padding included, as the GPU consumes them).
  ``--mixture`` reads the dataset as a two-source mixture (the same shards twice, weights 0.7 / 0.3, long
  documents upsampled) to show the draws' cost.

Then prints what one GPU consumes for the 1b preset (model FLOPs per token at 400 TFLOP/s x 40% MFU) beside it.
Not a test; the page cache is warm (the files were just written or read).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np

from lucid_megatron.config import load_model_config
from lucid_megatron.data.loader import make_train_loader
from lucid_megatron.data.mixture import open_mixture
from lucid_megatron.data.shards import ShardWriter, iter_shard_documents, read_manifest, write_manifest
from lucid_megatron.data.streams import Upsample
from lucid_megatron.timing import cpu_name

VOCAB, SHARDS, STREAMS = 32000, 16, 8
GPU_FLOPS, MFU = 400e12, 0.40


def write_dataset(directory: Path, tokens: int, seed: int = 0) -> None:
    """``tokens`` tokens of random documents in SHARDS shards (a manifest with an hf-like 32000-id tokenizer)."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(min(max(rng.lognormal(np.log(1024), 1.2), 16), 262144)))
    per_shard = -(-len(lengths) // SHARDS)
    directory.mkdir(parents=True)
    with ShardWriter(directory, "train", per_shard) as writer:
        for n in lengths:
            writer.add(rng.integers(0, VOCAB, n, dtype=np.int32))
    tokenizer = {"name": "bench", "kind": "hf", "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                 "path": None}
    write_manifest(directory, tokenizer, False, {"train": writer.info}, {"command": "bench_loader"})


def bare_read(paths: list[Path]) -> tuple[float, int]:
    started, size = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(4 << 20):
                size += len(chunk)
    return time.perf_counter() - started, size // 4


def tar_and_npy(paths: list[Path]) -> tuple[float, int]:
    started, tokens = time.perf_counter(), 0
    for path in paths:
        for document, _ in iter_shard_documents(path):
            tokens += len(document)
    return time.perf_counter() - started, tokens


def loader_rate(dataset, seq_length: int, workers: int, tokens: int) -> tuple[float, int]:
    rows = max(tokens // seq_length, 2 * STREAMS)
    batches = make_train_loader(dataset, seq_length=seq_length, micro_batch_size=1, dp_rank=0, dp_size=1,
                                num_streams=STREAMS, num_workers=workers, seed=0)
    next(batches)  # workers started, first shards opened: not what a long run pays per row
    started = time.perf_counter()
    for _ in range(rows - 1):
        next(batches)
    return time.perf_counter() - started, (rows - 1) * seq_length


def flops_per_token(seq_length: int) -> float:
    """Training FLOPs per token of the 1b preset: 6 x the matmul parameters (layers and output layer) plus
    causal attention's 6 x seq_length x hidden per layer (QK^T and AV, forward and backward; softmax's count,
    a lower bound for LUCID, whose preconditioner adds work)."""
    cfg = load_model_config("1b")
    d, kv = cfg.hidden_size, cfg.num_kv_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * cfg.ffn_hidden_size
    matmul = cfg.num_layers * per_layer + cfg.vocab_size * d
    return 6 * matmul + 6 * cfg.num_layers * seq_length * d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32 << 20)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dir", type=Path, help="dataset directory (written if absent; default: a temporary one)")
    parser.add_argument("--mixture", action="store_true", help="also read it as a two-source mixture")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.dir or Path(scratch) / "bench"
        if not (directory / "manifest.json").exists():
            write_dataset(directory, args.tokens)
        manifest = read_manifest(directory)
        paths = manifest.shard_paths("train")
        total = manifest.split("train").tokens
        print(f"# bench_loader {datetime.date.today()}, {cpu_name()}: {total / 2**20:.1f}M tokens in "
              f"{len(paths)} shards, {manifest.split('train').documents} documents\n")
        print("| reader | row length | workers | tokens/s (millions) |")
        print("|---|---|---|---|")
        bare_read(paths)  # the page cache holds them now
        for label, measure in (("bare read (4 MiB chunks)", bare_read), ("tar + npy (iter_shard_documents)",
                                                                           tar_and_npy)):
            seconds, tokens = measure(paths)
            print(f"| {label} | - | - | {tokens / seconds / 1e6:.1f} |")
        datasets = [("loader", manifest)]
        if args.mixture:
            datasets.append(("loader, 2-source mixture", open_mixture([
                ("a", manifest, 0.7, None), ("b", manifest, 0.3, Upsample(8192, 2))])))
        for label, dataset in datasets:
            for seq_length in args.seq_lengths:
                for workers in args.workers:
                    seconds, tokens = loader_rate(dataset, seq_length, workers, total)
                    print(f"| {label} | {seq_length} | {workers} | {tokens / seconds / 1e6:.2f} |")
        print("\n| row length | 1b FLOPs per token | tokens/s one GPU consumes at 400 TFLOP/s x 40% MFU |")
        print("|---|---|---|")
        for seq_length in args.seq_lengths:
            flops = flops_per_token(seq_length)
            print(f"| {seq_length} | {flops / 1e9:.1f} G | {GPU_FLOPS * MFU / flops:,.0f} |")


if __name__ == "__main__":
    main()
