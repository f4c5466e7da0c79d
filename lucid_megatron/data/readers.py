"""Text corpora for ``lucid data prepare``: which files an input names, how they are cut into parts, and
how a part's documents are read back.

Formats: ``.txt`` (a whole file is one document), ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (one document
per non-blank line, in field ``text_key``) and ``.parquet`` (one document per row of column ``text_key``).
Nothing reads a whole file into memory except a ``.txt`` (it is one document): JSONL streams are
decompressed chunk by chunk and split into lines, parquet files are read one row group, one batch at a time.

A **part** is a deterministic piece of the input: a run of ``.txt`` files, a run of consecutive lines of
one JSONL file (about ``part_bytes`` of text), or one parquet row group. The parts depend only on the
files and ``part_bytes``, never on timing, so their documents concatenated in part order are the
documents of the input in order. Bad input raises ``InputError`` naming the file and the line, row
group or byte offset.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_GLOB_CHARACTERS = frozenset("*?[")
_READ_BYTES = 1 << 20  # compressed bytes read at a time
_PARQUET_BATCH_ROWS = 256  # rows decoded at a time: bounds a worker's memory for long documents


class InputError(ValueError):
    """Bad input data; the message names the file and where in it (line, row group or byte offset)."""


def input_format(path) -> str | None:
    """The supported suffix ``path`` ends with (``.jsonl.gz`` before ``.gz``), or None."""
    name = os.path.basename(str(path))
    return next((suffix for suffix in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(suffix)), None)


def _allowed() -> str:
    return ", ".join(SUFFIXES)


def _supported_files(paths) -> list[Path]:
    return [Path(p) for p in paths if input_format(p) and os.path.isfile(p)]


def _check_readable_file(path) -> None:
    """Refuse an input that exists but is no readable regular file (a FIFO would block the read forever)."""
    from lucid_megatron.atomic import entry_kind

    kind = entry_kind(str(path))
    if kind is None:
        raise FileNotFoundError(f"input file {str(path)!r} does not exist")
    if kind != "a regular file":
        raise InputError(f"input {str(path)!r} is {kind}, not a regular file; allowed: files of {_allowed()}")
    if not os.access(path, os.R_OK):
        raise InputError(f"input file {str(path)!r} is not readable (permission denied)")


def _files_under(directory: str) -> Iterator[Path]:
    """Supported files under ``directory``, hidden files and directories left out; each a readable file."""
    for root, dirs, names in os.walk(directory):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in names:
            if not name.startswith(".") and input_format(name):
                _check_readable_file(Path(root) / name)
                yield Path(root) / name


def _expand_one(spec: str) -> list[Path]:
    """The files one input names: a file, every supported file under a directory, or a glob's matches."""
    if os.path.isdir(spec):
        found = sorted(_files_under(spec))
        if not found:
            raise InputError(f"input directory {spec!r} holds no {_allowed()} file")
        return found
    if _GLOB_CHARACTERS & set(spec) and not os.path.exists(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise InputError(f"input glob {spec!r} matches nothing")
        found = _supported_files(matches)
        if not found:
            raise InputError(f"input glob {spec!r} matches no {_allowed()} file (it matches {matches[0]!r}, ...)")
        return found
    if input_format(spec) is None:
        raise InputError(f"input {spec!r} has suffix {Path(spec).suffix!r}; allowed: {_allowed()}")
    _check_readable_file(spec)
    return [Path(spec)]


def expand_inputs(inputs) -> list[Path]:
    """Files, directories (searched recursively, sorted) and globs (sorted) -> the input files, in order.

    Every input must name at least one supported file; the result is never empty.
    """
    specs = [str(spec) for spec in inputs]
    if not specs:
        raise InputError(f"no inputs given; pass files, directories or globs of {_allowed()}")
    return [path for spec in specs for path in _expand_one(spec)]


# ----------------------------------------------------------------------------------------- parts


@dataclass(frozen=True)
class TextFiles:
    """Whole ``.txt`` files, one document each."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class JsonLines:
    """Consecutive raw lines of one JSONL file (blank ones included, so line numbers stay exact)."""

    path: str
    first_line: int  # 1-based number of lines[0]
    lines: tuple[bytes, ...]


@dataclass(frozen=True)
class RowGroup:
    """One row group of a parquet file."""

    path: str
    row_group: int


Source = TextFiles | JsonLines | RowGroup


@dataclass(frozen=True)
class Part:
    index: int  # position in the plan: parts are written out in this order
    source: Source
    input_bytes: int  # its share of the input files' sizes on disk (for progress only)


def plan_parts(paths: list[Path], text_key: str, part_bytes: int) -> Iterator[Part]:
    """Cut the input files into parts, lazily and in input order (JSONL lines are read here, streaming)."""
    index = 0
    pending: list[str] = []
    pending_bytes = 0

    def part(source: Source, input_bytes: int) -> Part:
        nonlocal index
        index += 1
        return Part(index - 1, source, input_bytes)

    for path in paths:
        suffix = input_format(path)
        if suffix == ".txt":
            size = path.stat().st_size
            if pending and pending_bytes + size > part_bytes:
                yield part(TextFiles(tuple(pending)), pending_bytes)
                pending, pending_bytes = [], 0
            pending.append(str(path))
            pending_bytes += size
            continue
        if pending:
            yield part(TextFiles(tuple(pending)), pending_bytes)
            pending, pending_bytes = [], 0
        if suffix == ".parquet":
            for group, input_bytes in _parquet_row_groups(path, text_key):
                yield part(RowGroup(str(path), group), input_bytes)
        else:
            for first_line, lines, input_bytes in _jsonl_pieces(path, suffix, part_bytes):
                yield part(JsonLines(str(path), first_line, lines), input_bytes)
    if pending:
        yield part(TextFiles(tuple(pending)), pending_bytes)


# ----------------------------------------------------------------------------------------- JSONL streams


def _decompressor(suffix: str):
    """A fresh decompression object for one gzip member / zstd frame (None: plain text)."""
    if suffix == ".jsonl.gz":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if suffix == ".jsonl.zst":
        return zstandard.ZstdDecompressor().decompressobj()
    return None


def _decompressed_chunks(raw, suffix: str) -> Iterator[bytes]:
    """Decompress ``raw`` chunk by chunk; concatenated members/frames are read on; a stream cut short raises."""
    where = "gzip" if suffix == ".jsonl.gz" else "zstd"
    decoder = _decompressor(suffix)
    fed = False
    try:
        while chunk := raw.read(_READ_BYTES):
            if decoder is None:
                yield chunk
                continue
            while chunk:
                fed = True
                yield decoder.decompress(chunk)
                if not decoder.eof:
                    break
                chunk = decoder.unused_data  # the next gzip member / zstd frame starts here
                decoder = _decompressor(suffix)
                fed = False
        if decoder is not None and fed and not decoder.eof:
            raise InputError(f"{raw.name}: truncated {where} stream: it ends at byte {raw.tell()} "
                             "in the middle of compressed data")
    except (zlib.error, zstandard.ZstdError) as err:
        raise InputError(f"{raw.name}: corrupt {where} stream near compressed byte offset {raw.tell()} "
                         f"({one_line(err)})") from err


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream into lines at b'\\n' (the newline is kept off); the last line may lack one."""
    pending: list[bytes] = []  # the current line's pieces so far (joined once: a long line is not re-copied)
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        pieces = chunk.split(b"\n")
        pieces[0] = b"".join([*pending, pieces[0]])
        pending = [pieces.pop()]
        yield from pieces
    tail = b"".join(pending)
    if tail:
        yield tail


def _jsonl_pieces(path: Path, suffix: str, part_bytes: int) -> Iterator[tuple[int, tuple[bytes, ...], int]]:
    """``(first line number, lines, input bytes)`` of about ``part_bytes`` of text each."""
    size = path.stat().st_size
    with open(path, "rb") as raw:
        lines: list[bytes] = []
        first_line, text_bytes, consumed = 1, 0, 0
        for number, line in enumerate(_lines(_decompressed_chunks(raw, suffix)), start=1):
            if not lines:
                first_line = number
            lines.append(line)
            text_bytes += len(line) + 1
            if text_bytes >= part_bytes:
                position = min(raw.tell(), size)
                yield first_line, tuple(lines), position - consumed
                lines, text_bytes, consumed = [], 0, position
        if lines or consumed < size:
            yield first_line, tuple(lines), size - consumed


def _jsonl_texts(source: JsonLines, text_key: str) -> Iterator[str]:
    for offset, raw in enumerate(source.lines):
        where = f"{source.path}:{source.first_line + offset}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of the line)") from err
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where}: not a JSON value ({err.msg})") from err
        if not isinstance(record, dict) or text_key not in record:
            raise InputError(f"{where}: no {text_key!r} field (set the field name with text_key)")
        text = record[text_key]
        if not isinstance(text, str):
            raise InputError(f"{where}: field {text_key!r} is {type(text).__name__}, expected a string")
        yield text


# ----------------------------------------------------------------------------------------- .txt and parquet


def _text_file(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte offset {err.start})") from err
    # Universal newlines, as text-mode reading gives them (the documents stay those of earlier versions).
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _open_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{path}: not a readable parquet file ({one_line(err)})") from err


def _parquet_row_groups(path: Path, text_key: str) -> Iterator[tuple[int, int]]:
    """``(row group, input bytes)`` after checking that ``text_key`` is a string column."""
    import pyarrow as pa

    parquet = _open_parquet(path)
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        raise InputError(f"{path}: no column {text_key!r} (columns: {', '.join(schema.names)}; "
                         "set the column name with text_key)")
    kind = schema.field(text_key).type
    value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
            or pa.types.is_string_view(value_kind)):
        raise InputError(f"{path}: column {text_key!r} has type {kind}, expected a string column")
    metadata = parquet.metadata
    size, rows = path.stat().st_size, max(metadata.num_rows, 1)
    counted = 0
    for group in range(metadata.num_row_groups):
        share = size - counted if group == metadata.num_row_groups - 1 else \
            size * metadata.row_group(group).num_rows // rows
        counted += share
        yield group, share


def _row_group_texts(source: RowGroup, text_key: str) -> Iterator[str]:
    import pyarrow as pa

    where = f"{source.path}: row group {source.row_group}"
    parquet = _open_parquet(source.path)
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[source.row_group],
                                          columns=[text_key]):
            values = batch.column(0).to_pylist()
            if None in values:
                raise InputError(f"{where}, row {row + values.index(None)}: {text_key!r} is null, expected a string")
            row += len(values)
            yield from values
    except InputError:
        raise
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{where}: cannot read it ({one_line(err)})") from err


def iter_texts(source: Source, text_key: str) -> Iterator[str]:
    """The documents of one part, in order (a document may be empty: the caller decides)."""
    if isinstance(source, TextFiles):
        return map(_text_file, source.paths)
    if isinstance(source, JsonLines):
        return _jsonl_texts(source, text_key)
    return _row_group_texts(source, text_key)


def one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages may span several)."""
    return " ".join(str(err).split()) or type(err).__name__
