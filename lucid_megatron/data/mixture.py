"""Weighted mixtures of prepared datasets: each virtual stream interleaves documents from every source.

Stream ``s`` draws the source of its ``n``-th document from ``default_rng([seed, s, n // DRAW_BLOCK, MIX_TAG])``
(one uniform number per draw, compared with the cumulative weights), then takes that source's next document.
Each source deals its own shards to the streams (shard ``i`` -> stream ``i % S``) and reads them epoch after
epoch like a single dataset (streams.py, ``SourceShards``), long documents repeated when it upsamples. The
draws depend only on (seed, stream, n), so the rows stay independent of data-parallel ranks and loader
workers, and a stream's state (the draw counter plus every source's position) resumes exactly.

A mixture stream's state::

    {"draws": 17, "offset": 64, "current": "web", "rows": 5, "num_streams": 8,
     "sources": {"web": {"epoch": 0, "shard": 1, "doc": 3, "tokens": 5120, "long_tokens": 0}, ...}}

``draws`` counts the documents taken so far; the next row starts inside document ``draws`` (``offset`` of its
tokens already packed), which comes from source ``current`` (the one draw ``draws`` picked), at that source's
position. Naming it, rather than drawing again, lets a run resume with new weights: the document under way is
finished, the draws after it follow the new weights. A
source's ``tokens`` / ``long_tokens`` count its tokens packed into rows so far (all, and those of documents
of at least ``upsample.min_tokens`` tokens): summed over streams they are the run's per-source totals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packing import RowPacker
from .shards import MANIFEST, Manifest, read_manifest
from .streams import SourceShards, Upsample

MIX_TAG = 0x6D6978  # "mix": keeps the draws' seeds apart from the shard orders' [seed, epoch, stream, source]
DRAW_BLOCK = 4096  # draws generated at once (a resumed stream regenerates one block)
SOURCE_KEYS = ("epoch", "shard", "doc", "tokens", "long_tokens")
StreamState = dict[str, object]


@dataclass(frozen=True)
class MixtureSource:
    """One prepared dataset of a mixture."""

    name: str
    manifest: Manifest
    weight: float
    upsample: Upsample | None = None


@dataclass(frozen=True)
class Mixture:
    """Prepared datasets sharing one tokenizer, drawn from in proportion to their weights."""

    sources: tuple[MixtureSource, ...]

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def tokenizer(self) -> dict:
        return self.sources[0].manifest.tokenizer

    def probabilities(self) -> np.ndarray:
        weights = np.asarray([source.weight for source in self.sources], dtype=np.float64)
        return weights / weights.sum()


def check_weights(names: Sequence[str], weights: Sequence[float]) -> None:
    """One line naming the first weight that cannot be a mixture weight (negative, NaN, not a number, all 0)."""
    for name, weight in zip(names, weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"source {name!r}: weight {weight!r} is not a number")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"source {name!r}: weight {weight!r} must be a finite number >= 0")
    if not any(weight > 0 for weight in weights):
        raise ValueError(f"every source weight is 0 ({', '.join(names)}); at least one must be > 0")


def open_mixture(specs: Iterable[tuple[str, str | Path | Manifest, float, Upsample | None]]) -> Mixture:
    """``(name, dataset directory or Manifest, weight, upsample)`` per source -> a Mixture; refuses repeated
    names, bad weights, and sources whose tokenizers differ (naming both)."""
    sources = tuple(MixtureSource(name, data if isinstance(data, Manifest) else read_manifest(data), weight,
                                  upsample) for name, data, weight, upsample in specs)
    if not sources:
        raise ValueError("a mixture needs at least one source")
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source names {repeated} are given more than once")
    check_weights(names, [source.weight for source in sources])
    first = sources[0]
    for other in sources[1:]:
        if other.manifest.tokenizer != first.manifest.tokenizer:
            raise ValueError(
                f"sources {first.name!r} and {other.name!r} use different tokenizers: "
                f"{first.manifest.tokenizer.get('name')!r} ({first.manifest.dir / MANIFEST}) and "
                f"{other.manifest.tokenizer.get('name')!r} ({other.manifest.dir / MANIFEST}); a mixture packs "
                "their tokens into the same rows, so prepare them with one tokenizer"
            )
    return Mixture(sources)


class SourceDraws:
    """Which source the ``n``-th document of one stream comes from: seeded by (seed, stream, n) only."""

    def __init__(self, probabilities: np.ndarray, seed: int, stream: int):
        cumulative = np.cumsum(probabilities)
        cumulative[-1] = 1.0  # rounding must never leave a uniform draw past the last source
        self.cumulative, self.seed, self.stream = cumulative, seed, stream
        self.block, self.choices = -1, np.empty(0, dtype=np.int64)

    def __call__(self, n: int) -> int:
        block, i = divmod(n, DRAW_BLOCK)
        if block != self.block:
            uniform = np.random.default_rng([self.seed, self.stream, block, MIX_TAG]).random(DRAW_BLOCK)
            # side="right": a source of weight 0 (an empty interval) is never chosen
            self.block, self.choices = block, np.searchsorted(self.cumulative, uniform, side="right")
        return int(self.choices[i])


def fresh_mixture_state(names: Sequence[str], num_streams: int) -> StreamState:
    sources = {name: {"epoch": 0, "shard": 0, "doc": 0, "tokens": 0, "long_tokens": 0} for name in names}
    return {"draws": 0, "offset": 0, "current": None, "rows": 0, "num_streams": num_streams, "sources": sources}


def _non_negative_ints(values: dict, keys: Sequence[str]) -> bool:
    return isinstance(values, dict) and all(
        not isinstance(values.get(k), bool) and isinstance(values.get(k), int) and values[k] >= 0 for k in keys)


def check_mixture_state(state, stream: int, num_streams: int, entries: dict[str, int]) -> StreamState:
    """Validate one mixture stream's saved state against this layout; ``entries``: each source's reading-order
    length (its shards dealt to the stream times its upsampling passes)."""
    where = f"state of stream {stream}"
    if not _non_negative_ints(state, ("draws", "offset", "rows")) or not isinstance(state.get("sources"), dict):
        raise ValueError(f"{where} must hold non-negative integers draws, offset, rows and the sources' positions "
                         f"(a mixture's state); got {state!r}")
    if state.get("num_streams") != num_streams:
        raise ValueError(f"{where} was saved with num_streams={state.get('num_streams')!r}; "
                         f"this loader has num_streams={num_streams}, which deals shards differently")
    if sorted(state["sources"]) != sorted(entries):
        raise ValueError(f"{where} was saved with sources {sorted(state['sources'])}; this mixture has "
                         f"{sorted(entries)} (a resumed mixture keeps its sources; weights may change)")
    if state.get("current") not in (None, *entries) or (state["offset"] and state.get("current") is None):
        raise ValueError(f"{where}: current={state.get('current')!r} must name the source of the document the next "
                         f"row starts in (one of {sorted(entries)}), or be None at offset 0")
    for name, position in state["sources"].items():
        if not _non_negative_ints(position, SOURCE_KEYS):
            raise ValueError(f"{where}: source {name!r} must hold non-negative integers {', '.join(SOURCE_KEYS)}; "
                             f"got {position!r}")
        if position["shard"] >= entries[name]:
            raise ValueError(f"{where}: source {name!r} points at position {position['shard']} of its reading "
                             f"order, which has {entries[name]} entries (were its shards or upsampling changed?)")
    return {**state, "sources": {name: dict(position) for name, position in state["sources"].items()}}


class MixtureStream:
    """One virtual stream of a mixture: the draws, one reader per source, and the rows they pack into."""

    def __init__(self, stream: int, num_streams: int, names: Sequence[str], sources: Sequence[SourceShards],
                 draws: SourceDraws):
        self.stream, self.num_streams = stream, num_streams
        self.names, self.sources, self.draws = list(names), list(sources), draws

    def documents(self, state: StreamState) -> Iterator[tuple[dict, np.ndarray, np.ndarray | None]]:
        """Yield ``(where, tokens, mask)`` from the state's position; ``where`` is the state before the
        document (plus its source and whether it counts as long, which ``_state_after`` folds in)."""
        positions = {name: dict(p) for name, p in state["sources"].items()}
        readers: dict[int, Iterator] = {}
        n, unpacked_offset = state["draws"], state["offset"]
        while True:
            k = self.names.index(state["current"]) if unpacked_offset else self.draws(n)
            name, source = self.names[k], self.sources[k]
            if k not in readers:
                p = positions[name]
                readers[k] = source.documents(p["epoch"], p["shard"], p["doc"])
            at, tokens, mask = next(readers[k])
            long = source.upsample is not None and source.upsample.is_long(len(tokens))
            if unpacked_offset:  # resumed inside this document: its first tokens are counted already
                positions[name]["tokens"] -= unpacked_offset
                positions[name]["long_tokens"] -= unpacked_offset if long else 0
                unpacked_offset = 0
            before = {nm: dict(p) for nm, p in positions.items()}
            before[name].update(at)
            yield {"draws": n, "sources": before, "source": name, "long": long}, tokens, mask
            positions[name].update(epoch=at["epoch"], shard=at["shard"], doc=at["doc"] + 1)
            positions[name]["tokens"] += len(tokens)
            positions[name]["long_tokens"] += len(tokens) if long else 0
            n += 1

    def _state_after(self, start: dict, rows: int) -> StreamState:
        """Where the next row starts (the packer's ``start``), with its document's packed tokens counted."""
        sources = {name: dict(p) for name, p in start["sources"].items()}
        pending = sources[start["source"]]
        pending["tokens"] += start["offset"]
        pending["long_tokens"] += start["offset"] if start["long"] else 0
        return {"draws": start["draws"], "offset": start["offset"], "current": start["source"], "rows": rows,
                "num_streams": self.num_streams, "sources": sources}

    def rows(self, packer: RowPacker, state: StreamState, max_rows: int | None = None):
        """Yield ``(global row index, PackedRow, state after the row)``; stops at ``max_rows`` (global)."""
        count = state["rows"]
        for row, start in packer.pack(self.documents(state), first_offset=state["offset"]):
            if max_rows is not None and count * self.num_streams + self.stream >= max_rows:
                return
            yield count * self.num_streams + self.stream, row, self._state_after(start, count + 1)
            count += 1


@dataclass(frozen=True)
class SourceTotals:
    """Per-source sums over streams' states: tokens packed so far, those of long documents, highest epoch."""

    tokens: dict[str, int]
    long_tokens: dict[str, int]
    epochs: dict[str, int]


def source_totals(states: Iterable[StreamState], names: Sequence[str]) -> SourceTotals:
    tokens, long_tokens, epochs = dict.fromkeys(names, 0), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    for state in states:
        for name, position in state.get("sources", {}).items():
            if name in tokens:
                tokens[name] += position["tokens"]
                long_tokens[name] += position["long_tokens"]
                epochs[name] = max(epochs[name], position["epoch"])
    return SourceTotals(tokens, long_tokens, epochs)
