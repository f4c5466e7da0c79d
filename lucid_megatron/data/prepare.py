"""``lucid data prepare``: tokenize text corpora into train/valid token shards, in parallel and resumably.

1. The inputs are cut into ordered parts (``readers.py``): runs of ``.txt`` files, runs of JSONL lines,
   parquet row groups.
2. Worker processes tokenize parts with the tokenizer's own batch encoding (one thread each) and write each
   part's tokens to files in a staging directory next to the output, renamed into place when complete.
3. This process writes the shards from the finished parts strictly in part order. The dataset therefore
   depends only on the inputs and arguments, never on the number of workers or the order they finish in.

Finished parts outlive a killed run: the same command run again reuses them. The dataset directory appears
only at the end, by one rename. See docs/data.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lucid_megatron.atomic import check_output_dir, publish_dir, write_text
from lucid_megatron.timing import peak_rss_bytes
from .readers import Part, expand_inputs, iter_texts, one_line, plan_parts
from .shards import ShardWriter, read_manifest, write_manifest
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

Tokenizer = ByteTokenizer | HFTokenizer
BatchEncoder = Callable[[list[str]], list[np.ndarray]]

DEFAULT_PART_BYTES = 8 << 20  # text per part: a few seconds of tokenizing; the unit of resume and of balancing
_ENCODE_BATCH_CHARS = 256 << 10  # text per batch-encoding call: bounds the tokenizer's transient memory
_RECORD_VERSION = 1


def default_workers() -> int:
    """The CPU cores this process may run on (a SLURM allocation or taskset may give fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_valid_document(index: int, seed: int, valid_fraction: float) -> bool:
    """Deterministic split assignment: a stable hash of (seed, document index), not Python's ``hash``."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < valid_fraction


# ----------------------------------------------------------------------------------------- tokenizing


def load_prepare_tokenizer(spec) -> Tokenizer:
    """``"byte"``, a tokenizer directory or a tokenizer; a directory that does not load is a one-line ValueError."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if str(spec) == "byte" or not os.path.isdir(spec):
        return load_tokenizer(str(spec))  # its own error names what is allowed
    try:
        return load_tokenizer(spec)
    except Exception as err:  # transformers and tokenizers raise many types for a broken directory
        raise ValueError(f"tokenizer directory {str(spec)!r} does not load: {one_line(err)}") from err


def batch_encoder(tokenizer: Tokenizer) -> BatchEncoder:
    """The tokenizer's own batch encoding: each text's token ids (int32), no special tokens added."""
    if tokenizer.kind == "byte":
        return lambda texts: [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) for text in texts]
    backend = getattr(tokenizer.to_hf(), "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer: one text at a time
        return lambda texts: [np.asarray(tokenizer.encode(text), dtype=np.int32) for text in texts]
    # Whole documents, as the wrapper's encode() gives them, even if tokenizer.json enables either.
    if backend.truncation:
        backend.no_truncation()
    if backend.padding:
        backend.no_padding()
    # encode_batch_fast skips the character offsets nobody here reads.
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [np.asarray(e.ids, dtype=np.int32) for e in encode(texts, add_special_tokens=False)]


def _text_batches(texts: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= _ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class PartFiles:
    """A finished part: ``.docs`` holds each document's token count (int64, 0 = empty, skipped),
    ``.tokens`` their tokens back to back (int32, BOS/EOS included). ``.docs`` is renamed into place
    last, so its presence marks the part complete."""

    directory: Path
    index: int

    @property
    def tokens(self) -> Path:
        return self.directory / f"part-{self.index:06d}.tokens"

    @property
    def docs(self) -> Path:
        return self.directory / f"part-{self.index:06d}.docs"

    def finished(self) -> bool:
        try:
            lengths = np.fromfile(self.docs, dtype=np.int64)
            return self.tokens.stat().st_size == 4 * int(lengths.sum())
        except (OSError, ValueError):
            return False

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromfile(self.docs, dtype=np.int64)
        tokens = np.fromfile(self.tokens, dtype=np.int32)
        if tokens.size != int(lengths.sum()) or (lengths < 0).any():
            raise OSError(f"part files {self.docs} / {self.tokens} do not match; remove them and run again")
        return lengths, tokens

    def write(self, lengths: list[int], token_chunks: Iterator[np.ndarray]) -> int:
        """Write the tokens as they come, then the counts; durable before the renames. Returns the token count."""
        tmp_tokens, tmp_docs = (path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in (self.tokens, self.docs))
        total = 0
        try:
            with open(tmp_tokens, "wb") as out:
                for chunk in token_chunks:
                    chunk.tofile(out)
                    total += chunk.size
                out.flush()
                os.fsync(out.fileno())
            with open(tmp_docs, "wb") as out:
                np.asarray(lengths, dtype=np.int64).tofile(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp_tokens, self.tokens)
            os.replace(tmp_docs, self.docs)
        finally:
            tmp_tokens.unlink(missing_ok=True)
            tmp_docs.unlink(missing_ok=True)
        return total


@dataclass(frozen=True)
class PartResult:
    documents: int
    tokens: int
    peak_rss_bytes: int  # of the worker process, so far


@dataclass
class _Worker:
    encode: BatchEncoder
    text_key: str
    bos: np.ndarray
    eos: np.ndarray

    def encode_documents(self, texts: list[str], lengths: list[int]) -> np.ndarray:
        """Tokens of the non-empty texts with BOS/EOS, back to back; appends each text's count to ``lengths``."""
        keep = [i for i, text in enumerate(texts) if text.strip()]
        counts = [0] * len(texts)
        pieces = []
        for i, ids in zip(keep, self.encode([texts[i] for i in keep]) if keep else []):
            if ids.size:
                pieces += [self.bos, ids, self.eos]
                counts[i] = len(self.bos) + ids.size + len(self.eos)
        lengths += counts
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


_WORKER: _Worker | None = None


def init_worker(tokenizer_spec: str, text_key: str, add_bos: bool, add_eos: bool) -> None:
    """Load the tokenizer once per worker process; one tokenizer thread (the workers are the parallelism)."""
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    tokenizer = load_prepare_tokenizer(tokenizer_spec)
    specials = (lambda token, on: np.asarray([token] * on, dtype=np.int32))
    _WORKER = _Worker(batch_encoder(tokenizer), text_key, specials(tokenizer.bos_id, add_bos),
                      specials(tokenizer.eos_id, add_eos))


def _start_worker_process(*init_args) -> None:
    _die_with_parent()
    init_worker(*init_args)


def _die_with_parent() -> None:
    """A SIGKILLed prepare gives its workers no chance to stop; the kernel ends them with their parent
    (the forkserver, which exits with the main process)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def tokenize_part(part: Part, parts_dir: str) -> PartResult:
    """Worker side: tokenize one part into its part files (needs ``init_worker`` first)."""
    worker = _WORKER
    lengths: list[int] = []
    chunks = (worker.encode_documents(texts, lengths) for texts in _text_batches(iter_texts(part.source, worker.text_key)))
    tokens = PartFiles(Path(parts_dir), part.index).write(lengths, chunks)
    return PartResult(len(lengths), tokens, peak_rss_bytes())


def _worker_ready() -> int:
    time.sleep(0.05)  # hold this worker a moment, so the next call starts another
    return os.getpid()


def _process_pool(workers: int, init_args: tuple) -> Executor:
    """Workers forked from a forkserver that imported this module once (not one torch import per worker)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker_process, initargs=init_args)


# ----------------------------------------------------------------------------------------- staging


class Staging:
    """``.<out name>.prepare/`` next to the output: a lock, ``record.json`` (what made the parts), ``parts/``
    (finished parts, kept across runs) and ``dataset/`` (the shards being written, renamed to the output)."""

    def __init__(self, out: Path):
        self.out = out
        self.root = out.parent / f".{out.name}.prepare"
        self.parts = self.root / "parts"
        self.dataset = self.root / "dataset"
        self._lock: int | None = None

    def open(self, record: dict) -> str:
        """Lock, then keep the finished parts if they were made the same way, else drop them.

        Returns "new" (no earlier run), "resume" (its parts are kept) or "restart" (they were made differently)."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise OSError(f"another `lucid data prepare` is writing {str(self.out)!r} (it holds {self.root / 'lock'})")
        self._lock = lock
        record_path = self.root / "record.json"
        try:
            state = "resume" if json.loads(record_path.read_text(encoding="utf-8")) == record else "restart"
        except FileNotFoundError:
            state = "new"
        except (OSError, ValueError):
            state = "restart"
        if state != "resume":
            shutil.rmtree(self.parts, ignore_errors=True)
            write_text(record_path, json.dumps(record, indent=1) + "\n")
        self.parts.mkdir(exist_ok=True)
        for stale in self.parts.glob(".*.tmp-*"):  # a killed worker's half-written part
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.dataset, ignore_errors=True)  # shards are always rewritten, from the parts
        self.dataset.mkdir()
        return state

    def part_files(self, index: int) -> PartFiles:
        return PartFiles(self.parts, index)

    def close(self, *, remove: bool) -> None:
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _record(paths: list[Path], tokenizer: Tokenizer, text_key: str, add_bos: bool, add_eos: bool,
            part_bytes: int) -> dict:
    """Everything the parts depend on: a rerun reuses them only if this is unchanged (JSON-ready)."""
    def stamp(path: Path) -> list:
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]

    tokenizer_files = [] if tokenizer.path is None else \
        [stamp(p) for p in sorted(Path(tokenizer.path).iterdir()) if p.is_file()]
    return {"version": _RECORD_VERSION, "inputs": [stamp(p) for p in paths], "tokenizer": tokenizer.manifest_entry(),
            "tokenizer_files": tokenizer_files, "text_key": text_key, "add_bos": add_bos, "add_eos": add_eos,
            "part_bytes": part_bytes}


# ----------------------------------------------------------------------------------------- in part order


def _in_part_order(parts: Iterator[Part], staging: Staging, executor: Executor,
                   window: int) -> Iterator[tuple[Part, PartResult | None]]:
    """Finished parts in plan order (result None: reused from an earlier run); up to ``window`` parts ahead are
    submitted, so workers keep busy while this process writes shards."""
    pending: deque[tuple[Part, Future | None]] = deque()

    def ready(future: Future | None) -> bool:
        return future is None or future.done()

    for part in parts:
        reused = staging.part_files(part.index).finished()
        pending.append((part, None if reused else executor.submit(tokenize_part, part, str(staging.parts))))
        while pending and (len(pending) >= window or ready(pending[0][1])):
            part, future = pending.popleft()
            yield part, None if future is None else future.result()
    for part, future in pending:
        yield part, None if future is None else future.result()


class _Splitter:
    """Deals documents to train/valid by their global index in input order (empty ones are counted, not written)."""

    def __init__(self, train: ShardWriter, valid: ShardWriter, seed: int, valid_fraction: float):
        self.train, self.valid, self.seed, self.valid_fraction = train, valid, seed, valid_fraction
        self.index = self.skipped = 0

    def add(self, lengths: np.ndarray, tokens: np.ndarray) -> None:
        offset = 0
        for length in lengths.tolist():
            if length:
                split = self.valid if is_valid_document(self.index, self.seed, self.valid_fraction) else self.train
                split.add(tokens[offset:offset + length])
                offset += length
            else:
                self.skipped += 1
            self.index += 1


class Progress:
    """A status line on stderr, rewritten in place when stderr is a terminal, and one summary line at the end."""

    def __init__(self, total_bytes: int, workers: int, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.total_bytes, self.workers = max(total_bytes, 1), workers
        self.start = self._shown = time.monotonic()
        self.parts = self.reused = self.documents = self.tokens = 0
        self.done_bytes = self.new_bytes = self.new_tokens = self.worker_rss = 0

    def note(self, message: str) -> None:
        self.stream.write(f"lucid data prepare: {message}\n")

    def restart_clock(self) -> None:
        self.start = time.monotonic()

    def add(self, part: Part, lengths: np.ndarray, result: PartResult | None) -> None:
        self.parts += 1
        self.documents += lengths.size
        self.tokens += int(lengths.sum())
        self.done_bytes += part.input_bytes
        if result is None:
            self.reused += 1
        else:
            self.new_bytes += part.input_bytes
            self.new_tokens += result.tokens
            self.worker_rss = max(self.worker_rss, result.peak_rss_bytes)
        now = time.monotonic()
        if self.live and now - self._shown >= 0.5:
            self._shown = now
            self.stream.write(f"\r{self._status(now)}\033[K")
            self.stream.flush()

    def _status(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        done = min(self.done_bytes / self.total_bytes, 1.0)
        left = (self.total_bytes - self.done_bytes) * elapsed / self.new_bytes if self.new_bytes else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "--:--:--"
        return (f"prepare: {100 * done:5.1f}%  {self.documents:,} documents  {self.tokens:,} tokens  "
                f"{self.new_tokens / elapsed:,.0f} tokens/s  ETA {eta}")

    def finish(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        mib = 1 << 20
        line = (f"prepared {self.documents:,} documents, {self.tokens:,} tokens from {self.parts} parts "
                f"({self.reused} reused) in {elapsed:.2f} s: {self.new_tokens / elapsed:,.0f} tokens/s with "
                f"{self.workers} workers; peak RSS {self.worker_rss / mib:.0f} MiB per worker, "
                f"{peak_rss_bytes() / mib:.0f} MiB main process")
        self.stream.write(("\r\033[K" if self.live else "") + line + "\n")
        self.stream.flush()
        return line


# ----------------------------------------------------------------------------------------- the command


def _check_arguments(valid_fraction, seed, docs_per_shard, workers, part_bytes) -> None:
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r} is not allowed; allowed: 0 <= valid_fraction < 1")
    for name, value, least in (("seed", seed, None), ("docs_per_shard", docs_per_shard, 1), ("workers", workers, 1),
                               ("part_bytes", part_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
            allowed = "an integer" if least is None else f"an integer >= {least}"
            raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def prepare_dataset(inputs, out_dir, *, tokenizer, valid_fraction: float = 0.01, docs_per_shard: int = 1000,
                    text_key: str = "text", seed: int = 0, add_bos: bool = True, add_eos: bool = True,
                    workers: int | None = None, part_bytes: int = DEFAULT_PART_BYTES):
    """Tokenize ``inputs`` (files, directories, globs) into ``out_dir`` (train and valid splits, no answer mask).

    Returns the Manifest. ``workers`` processes tokenize (default: this machine's cores); the result is the
    same for any ``workers`` and ``part_bytes``. Documents whose text is empty or only whitespace (or encodes
    to no tokens) are skipped and counted in ``source``. ``out_dir`` must be absent or empty; it appears only
    once everything is written. Bad input raises ValueError naming the file and where, leaving nothing behind;
    an interrupted run leaves its finished parts for the same call to continue from.
    """
    return _prepare(inputs, out_dir, tokenizer=tokenizer, valid_fraction=valid_fraction, docs_per_shard=docs_per_shard,
                    text_key=text_key, seed=seed, add_bos=add_bos, add_eos=add_eos,
                    workers=default_workers() if workers is None else workers, part_bytes=part_bytes,
                    make_executor=_process_pool)


def _prepare(inputs, out_dir, *, tokenizer, valid_fraction, docs_per_shard, text_key, seed, add_bos, add_eos, workers,
             part_bytes, make_executor: Callable[[int, tuple], Executor], progress_stream=None):
    _check_arguments(valid_fraction, seed, docs_per_shard, workers, part_bytes)
    tokenizer = load_prepare_tokenizer(tokenizer)
    paths = expand_inputs(inputs)
    out = check_output_dir(out_dir)
    staging = Staging(out)
    progress = Progress(sum(p.stat().st_size for p in paths), workers, progress_stream)
    state = staging.open(_record(paths, tokenizer, text_key, add_bos, add_eos, part_bytes))
    if state != "new":
        progress.note(f"continuing from the finished parts in {staging.root}" if state == "resume" else
                      f"the parts in {staging.root} were made from other inputs or arguments; starting over")
    init_args = ("byte" if tokenizer.kind == "byte" else tokenizer.path, text_key, add_bos, add_eos)
    try:
        with ShardWriter(staging.dataset, "train", docs_per_shard) as train, \
                ShardWriter(staging.dataset, "valid", docs_per_shard) as valid:
            splitter = _Splitter(train, valid, seed, valid_fraction)
            executor = make_executor(workers, init_args)
            try:
                for future in [executor.submit(_worker_ready) for _ in range(workers)]:
                    future.result()  # workers started and their tokenizers loaded before the clock starts
                progress.restart_clock()
                parts = plan_parts(paths, text_key, part_bytes)
                for part, result in _in_part_order(parts, staging, executor, window=2 * workers + 2):
                    lengths, tokens = staging.part_files(part.index).read()
                    splitter.add(lengths, tokens)
                    progress.add(part, lengths, result)
            finally:
                executor.shutdown(wait=True, cancel_futures=True)
        if train.info.documents == 0:
            raise ValueError(f"no train documents: {splitter.index} read, {splitter.skipped} empty, "
                             f"{valid.info.documents} assigned to valid (valid_fraction={valid_fraction})")
        source = {"command": "lucid data prepare", "inputs": [str(p.resolve()) for p in paths],
                  "text_key": text_key, "valid_fraction": valid_fraction, "seed": seed, "add_bos": add_bos,
                  "add_eos": add_eos, "documents_read": splitter.index, "empty_documents_skipped": splitter.skipped}
        write_manifest(staging.dataset, tokenizer, False, {"train": train.info, "valid": valid.info}, source)
        publish_dir(staging.dataset, out)
    except ValueError:  # bad input or arguments: nothing is left behind
        staging.close(remove=True)
        raise
    except BrokenProcessPool as err:
        staging.close(remove=False)
        raise OSError(f"a prepare worker process died (killed? out of memory?); the finished parts are kept in "
                      f"{staging.root}: run the same command again to continue") from err
    except BaseException:  # interrupted, disk full, ...: the finished parts stay for a rerun
        staging.close(remove=False)
        raise
    staging.close(remove=True)
    progress.finish()
    return read_manifest(out)
