"""Virtual streams: the unit of data order, independent of data-parallel ranks and loader workers.

Shard ``i`` of a split belongs to stream ``i % num_streams``. A stream reads its shards in order
(reshuffled each epoch when asked), packs rows, and after its last shard starts the next epoch.
Global row ``r`` is row ``r // num_streams`` of stream ``r % num_streams``.

A stream's state is where its next row starts: ``epoch``, ``shard`` (position in that epoch's
order), ``doc`` (document index inside the shard), ``offset`` (tokens of that document already
packed), plus ``rows`` (rows emitted so far, which fixes their global indices) and ``num_streams``
(to refuse a state from another layout). Resuming opens one shard and skips ``doc`` documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packing import RowPacker
from .shards import ShardError, iter_shard_documents

STATE_KEYS = ("epoch", "shard", "doc", "offset", "rows")


def deal_shards(num_shards: int, num_streams: int) -> list[list[int]]:
    """Shard indices of each stream: shard i -> stream i % num_streams."""
    if num_shards < num_streams:
        raise ValueError(f"{num_shards} shards cannot feed num_streams={num_streams}: every stream needs at "
                         "least one shard; use fewer streams or write smaller shards (--docs-per-shard)")
    return [list(range(s, num_shards, num_streams)) for s in range(num_streams)]


def fresh_state(num_streams: int) -> dict:
    return {"epoch": 0, "shard": 0, "doc": 0, "offset": 0, "rows": 0, "num_streams": num_streams}


def check_state(state, stream: int, num_streams: int, num_shards: int) -> dict:
    """Validate one stream's saved state (plain ints) against this layout."""
    where = f"state of stream {stream}"
    if not isinstance(state, dict) or any(
        isinstance(state.get(k), bool) or not isinstance(state.get(k), int) or state[k] < 0 for k in STATE_KEYS
    ):
        raise ValueError(f"{where} must hold non-negative integers {', '.join(STATE_KEYS)}; got {state!r}")
    if state.get("num_streams") != num_streams:
        raise ValueError(f"{where} was saved with num_streams={state.get('num_streams')!r}; "
                         f"this loader has num_streams={num_streams}, which deals shards differently")
    if state["shard"] >= num_shards:
        raise ValueError(f"{where} points at shard position {state['shard']}, but the stream has {num_shards} shards")
    return dict(state)


@dataclass(frozen=True)
class Upsample:
    """Documents of at least ``min_tokens`` tokens are read ``factor`` times per epoch of their source."""

    min_tokens: int
    factor: int

    def is_long(self, length: int) -> bool:
        return length >= self.min_tokens


@dataclass(frozen=True)
class SourceShards:
    """One dataset's shards dealt to one stream, and how that stream reads them, epoch after epoch.

    An epoch's order is a list of (shard, pass) entries: pass 0 of every shard reads all its documents;
    with ``upsample``, passes 1 .. factor-1 read only its long documents. The entries are shuffled together
    (``shuffle``), so the repeats spread over the epoch. ``index`` (the source's place in a mixture) keys
    the shuffle; source 0 without upsampling reads exactly what a single dataset's stream reads.
    """

    stream: int
    paths: list[Path]
    shard_documents: list[int] | None
    seed: int
    shuffle: bool
    one_pass: bool
    on_bad_shard: str
    vocab_size: int | None = None
    index: int = 0
    upsample: Upsample | None = None

    @property
    def passes(self) -> int:
        return 1 if self.upsample is None else self.upsample.factor

    def order(self, epoch: int) -> list[int]:
        """Entries ``j`` of the epoch's reading order: shard ``j % len(paths)``, pass ``j // len(paths)``."""
        entries = len(self.paths) * self.passes
        if not self.shuffle:
            return list(range(entries))
        key = [self.seed, epoch, self.stream] + ([self.index] if self.index else [])
        return np.random.default_rng(key).permutation(entries).tolist()

    def documents(self, epoch: int, shard: int, doc: int):
        """Yield ``({"epoch", "shard", "doc"}, tokens, mask)`` from the given position onwards; ``shard`` is the
        position in the epoch's order, ``doc`` the document's index inside its shard file."""
        while not (self.one_pass and epoch > 0):
            whole_epoch, produced = shard == 0 and doc == 0, False
            order = self.order(epoch)
            for position in range(shard, len(order)):
                i, repeat = order[position] % len(self.paths), order[position] >= len(self.paths)
                first = doc if position == shard else 0
                expected = self.shard_documents[i] if self.shard_documents else None
                found = iter_shard_documents(self.paths[i], on_bad_shard=self.on_bad_shard, start=first,
                                             expected_documents=expected, vocab_size=self.vocab_size)
                for k, (tokens, mask) in enumerate(found, start=first):
                    if repeat and not self.upsample.is_long(len(tokens)):
                        continue  # a repeat pass reads the long documents only
                    produced = True
                    yield {"epoch": epoch, "shard": position, "doc": k}, tokens, mask
            if whole_epoch and not produced:
                names = ", ".join(str(p) for p in self.paths)
                raise ShardError(f"stream {self.stream} read a whole epoch without a document; its shards: {names}")
            epoch, shard, doc = epoch + 1, 0, 0


class ShardStream:
    """One virtual stream of one dataset: its shards, their per-epoch order, and the rows they pack into."""

    def __init__(self, stream: int, num_streams: int, paths: list[Path], shard_documents: list[int] | None, *,
                 seed: int, shuffle: bool, one_pass: bool, on_bad_shard: str, vocab_size: int | None = None):
        self.stream, self.num_streams = stream, num_streams
        self.source = SourceShards(stream, paths, shard_documents, seed, shuffle, one_pass, on_bad_shard, vocab_size)

    def order(self, epoch: int) -> list[int]:
        return self.source.order(epoch)

    def documents(self, epoch: int, shard: int, doc: int):
        return self.source.documents(epoch, shard, doc)

    def rows(self, packer: RowPacker, state: dict, max_rows: int | None = None):
        """Yield ``(global row index, PackedRow, state after the row)``; stops at ``max_rows`` (global)."""
        count = state["rows"]

        def index():
            return count * self.num_streams + self.stream

        if max_rows is not None and index() >= max_rows:
            return
        docs = self.documents(state["epoch"], state["shard"], state["doc"])
        for row, start in packer.pack(docs, first_offset=state["offset"]):
            # Ran out (one pass only): the state then means "start of the epoch after the pass".
            start = start or {"epoch": 1, "shard": 0, "doc": 0, "offset": 0}
            yield index(), row, {**start, "rows": count + 1, "num_streams": self.num_streams}
            count += 1
            if max_rows is not None and index() >= max_rows:
                return
