"""Tokens/s of ``lucid data prepare`` beside the bare tokenizer's batch encoding of the same text, on one thread.

    python benchmarks/bench_prepare.py [--mb 32] [--workers 1 2] [--vocab 16384]

One run: a synthetic corpus (one JSONL file of ``--mb`` MiB), a byte-level BPE trained on a sample of it, then
(1) the tokenizer's own ``encode_batch_fast`` over every text on one thread, in the batches prepare uses, and
(2) ``lucid data prepare`` with each ``--workers`` count, as a subprocess. A prepare's rate is the bare
token count over its pipeline time (from its summary line: workers started to dataset published); the
whole command's wall time (Python, torch and worker start-up included) is shown beside it. Goal: prepare
is tokenizer-bound, >= 0.8 x workers x the bare rate. Peak RSS per worker and of the main process come
from the same summary line. Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# One tokenizer thread here, as in each prepare worker; set before the tokenizers library starts its pool.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Pseudo-text documents (a fixed lexicon of syllable words, ~100-700 words each) as one JSONL file."""
    rng = np.random.default_rng(seed)
    syllables = np.array(["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "je",
                          "pa", "zu", "tha", "ing", "er", "on", "st", "qu", "é", "ß"])
    lexicon = ["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(20000)]
    lexicon += [".", ",", "The", "And", "\n"]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    target, written, documents = int(megabytes * (1 << 20)), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            words = rng.choice(len(lexicon), size=int(rng.integers(100, 700)), p=weights)
            line = json.dumps({"text": " ".join(lexicon[i] for i in words)}) + "\n"
            f.write(line)
            written += len(line.encode())
            documents += 1
    return documents


def train_tokenizer(corpus: Path, directory: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with open(corpus, encoding="utf-8") as f:
        sample = [json.loads(line)["text"] for _, line in zip(range(2000), f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<bos>", "<eos>", "<pad>"],
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(directory)


def bare_encoding(corpus: Path, tokenizer_dir: Path) -> tuple[int, float]:
    """(tokens, seconds) of the tokenizer's batch encoding of every text, one thread, texts already in memory."""
    from lucid_megatron.data.prepare import _text_batches, batch_encoder, load_prepare_tokenizer

    with open(corpus, encoding="utf-8") as f:
        batches = list(_text_batches(json.loads(line)["text"] for line in f))
    encode = batch_encoder(load_prepare_tokenizer(str(tokenizer_dir)))
    start = time.perf_counter()
    tokens = sum(ids.size for batch in batches for ids in encode(batch))
    return tokens, time.perf_counter() - start


def run_prepare(corpus: Path, tokenizer_dir: Path, out: Path, workers: int) -> dict:
    command = [sys.executable, "-m", "lucid_megatron", "data", "prepare", str(corpus), "--out", str(out),
               "--tokenizer", str(tokenizer_dir), "--workers", str(workers)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    summary = result.stderr.strip().splitlines()[-1]
    found = re.search(r"in ([\d.]+) s: .* peak RSS (\d+) MiB per worker, (\d+) MiB main process", summary)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = manifest["splits"].values()
    return {"seconds": float(found.group(1)), "wall": wall, "worker_rss": int(found.group(2)),
            "main_rss": int(found.group(3)), "documents": sum(s["documents"] for s in splits),
            "tokens": sum(s["tokens"] for s in splits)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size (MiB of JSONL)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab", type=int, default=16384)
    args = parser.parse_args(argv)
    from lucid_megatron.timing import cpu_name

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, tokenizer_dir = tmp / "corpus.jsonl", tmp / "tokenizer"
        documents = write_corpus(corpus, args.mb)
        train_tokenizer(corpus, tokenizer_dir, args.vocab)
        tokens, seconds = bare_encoding(corpus, tokenizer_dir)
        bare_rate = tokens / seconds
        print(f"# {datetime.date.today()} | {cpu_name()} | {os.cpu_count()} CPUs | corpus: one JSONL of "
              f"{corpus.stat().st_size / (1 << 20):.1f} MiB, {documents} documents, {tokens} tokens | "
              f"BPE vocabulary {args.vocab}\n")
        print("| run | seconds | tokens/s | x bare | whole command s | peak RSS per worker | main RSS |")
        print("|---|---|---|---|---|---|---|")
        print(f"| bare `encode_batch_fast`, 1 thread | {seconds:.1f} | {bare_rate:,.0f} | 1.00 | | | |")
        for workers in args.workers:
            run = run_prepare(corpus, tokenizer_dir, tmp / f"out-{workers}", workers)
            assert run["documents"] == documents and run["tokens"] == tokens + 2 * documents  # + BOS and EOS
            rate = tokens / run["seconds"]
            print(f"| prepare, {workers} worker{'s' * (workers > 1)} | {run['seconds']:.1f} | {rate:,.0f} | "
                  f"{rate / bare_rate:.2f} | {run['wall']:.1f} | {run['worker_rss']} MiB | {run['main_rss']} MiB |")


if __name__ == "__main__":
    main()
