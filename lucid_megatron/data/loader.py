"""Train and eval loaders: packed rows from virtual streams, split over DP ranks and loader workers.

DP rank ``d`` of ``D`` owns streams ``s % D == d``; its loader worker ``w`` of ``W`` owns the rank's
``j``-th stream (``j = s // D``) when ``j % W == w``. Every process emits its rows in global row
order, so the rows of a global batch do not depend on ``D`` or ``W``, and a state merged from the
micro-batches actually consumed resumes on any layout. See docs/data.md and streams.py.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lucid_megatron.errors import ConfigError  # the layout is checked against config values

from .packing import RowPacker
from .shards import Manifest, read_manifest
from .mixture import Mixture, MixtureStream, SourceDraws, check_mixture_state, fresh_mixture_state
from .streams import ShardStream, SourceShards, check_state, deal_shards, fresh_state


@dataclass
class MicroBatch:
    """Packed rows on the host, as the loader made them (``Runtime.micro_batch`` places them on the device)."""

    tokens: torch.Tensor  # [1, T] int64, T = num_rows * seq_length
    labels: torch.Tensor  # [1, T] int64
    loss_weight: torch.Tensor  # [1, T] float32
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 in every segment
    cu_seqlens: torch.Tensor  # [k + 1] int32, segment boundaries over all rows
    max_seqlen: int  # longest segment
    num_rows: int
    stream_states: dict[str, dict]  # str(stream) -> its state after these rows
    row_indices: list[int] = field(default_factory=list)  # global row index of each row

    @classmethod
    def padding(cls, num_rows: int, seq_length: int, pad_id: int) -> "MicroBatch":
        """Rows of padding with loss weight 0: a forward pass that contributes nothing (for ranks that ran
        out of validation rows, while the others still need them in ZeRO-3's collective weight gathers)."""
        total = num_rows * seq_length
        return cls(
            tokens=torch.full((1, total), pad_id, dtype=torch.int64), labels=torch.full((1, total), pad_id, dtype=torch.int64),
            loss_weight=torch.zeros(1, total), position_ids=torch.arange(seq_length).repeat(num_rows).unsqueeze(0),
            cu_seqlens=torch.arange(0, total + 1, seq_length, dtype=torch.int32), max_seqlen=seq_length,
            num_rows=num_rows, stream_states={},
        )


def _positive(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _as_manifest(dataset) -> Manifest:
    return dataset if isinstance(dataset, Manifest) else read_manifest(dataset)


def check_stream_layout(manifest, num_streams: int, dp_size: int, num_workers: int, global_batch_size: int) -> None:
    """Refuse, before any process starts, streams the train loader cannot serve deterministically: every reader
    (DP rank x loader worker) owns whole streams, a global batch takes as many rows from each stream, and
    every stream has a shard."""
    manifest = _as_manifest(manifest)
    for name, value, low in (("num_streams", num_streams, 1), ("dp_size", dp_size, 1),
                             ("num_workers", num_workers, 0), ("global_batch_size", global_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}={value!r}: must be an integer >= {low}")
    readers = dp_size * max(num_workers, 1)
    if num_streams % readers:
        raise ConfigError(f"num_streams={num_streams} must be a multiple of dp_size*num_workers={readers} "
                          f"(dp_size={dp_size}, num_workers={num_workers}) so every reader owns whole streams")
    if global_batch_size % num_streams:
        raise ConfigError(f"global_batch_size={global_batch_size} must be a multiple of num_streams={num_streams} "
                          "so each global batch takes the same number of rows from every stream")
    shards = len(manifest.split("train").shards)
    if shards < num_streams:
        raise ConfigError(f"dataset {str(manifest.dir)!r} has {shards} train shards, fewer than "
                          f"num_streams={num_streams}; every stream needs at least one shard")


def _dealt_shards(manifest: Manifest, split: str, shards: list[int]) -> tuple[list, list[int] | None]:
    """Paths and document counts of the given shards of ``split``."""
    info, paths = manifest.split(split), manifest.shard_paths(split)
    counts = [info.shard_documents[i] for i in shards] if info.shard_documents else None
    return [paths[i] for i in shards], counts


def _dataset_streams(manifest: Manifest, split: str, mine: list[int], num_streams: int, state: dict, options: dict):
    """One dataset's streams (today's format of the state: docs/data.md)."""
    dealt = deal_shards(len(manifest.split(split).shards), num_streams)
    streams, start = {}, {}
    for s in mine:
        paths, counts = _dealt_shards(manifest, split, dealt[s])
        streams[s] = ShardStream(s, num_streams, paths, counts, vocab_size=int(manifest.tokenizer["vocab_size"]),
                                 **options)
        saved = state.get(str(s))
        start[s] = fresh_state(num_streams) if saved is None else check_state(saved, s, num_streams, len(dealt[s]))
    return streams, start


def _mixture_streams(mixture: Mixture, split: str, mine: list[int], num_streams: int, state: dict, options: dict):
    """A mixture's streams: each interleaves its share of every source's shards (data/mixture.py)."""
    dealt = []
    for source in mixture.sources:
        try:
            dealt.append(deal_shards(len(source.manifest.split(split).shards), num_streams))
        except ValueError as err:
            raise ValueError(f"source {source.name!r} ({source.manifest.dir}): {err}") from None
    streams, start = {}, {}
    for s in mine:
        readers = []
        for k, source in enumerate(mixture.sources):
            paths, counts = _dealt_shards(source.manifest, split, dealt[k][s])
            readers.append(SourceShards(s, paths, counts, vocab_size=int(source.manifest.tokenizer["vocab_size"]),
                                        index=k, upsample=source.upsample, **options))
        streams[s] = MixtureStream(s, num_streams, mixture.names, readers,
                                   SourceDraws(mixture.probabilities(), options["seed"], s))
        saved = state.get(str(s))
        entries = {reader_name: len(r.paths) * r.passes for reader_name, r in zip(mixture.names, readers)}
        start[s] = (fresh_mixture_state(mixture.names, num_streams) if saved is None
                    else check_mixture_state(saved, s, num_streams, entries))
    return streams, start


class TrainRows(IterableDataset):
    """Packed rows of this DP rank (and, inside a DataLoader worker, of that worker), in global order.

    Yields dicts ``{"index", "stream", "row": PackedRow, "state"}``; ``state`` is the stream's state
    after the row.
    """

    def __init__(self, dataset_dir, *, split: str = "train", seq_length: int, dp_rank: int, dp_size: int,
                 num_streams: int, num_workers: int = 0, seed: int = 0, shuffle_shards: bool = True,
                 loss_tokens: str = "all", on_bad_shard: str = "error", state: dict | None = None,
                 one_pass: bool = False, max_rows: int | None = None):
        mixture = dataset_dir if isinstance(dataset_dir, Mixture) else None
        manifests = [s.manifest for s in mixture.sources] if mixture else [_as_manifest(dataset_dir)]
        _positive("dp_size", dp_size)
        _positive("num_streams", num_streams)
        _positive("num_workers", num_workers, 0)
        _positive("seed", seed, 0)
        if not (isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
            raise ValueError(f"dp_rank={dp_rank!r} is not allowed; allowed: 0..{dp_size - 1}")
        readers = dp_size * max(num_workers, 1)
        if num_streams % readers and not one_pass:  # eval may leave a rank without streams: it reads nothing
            raise ValueError(f"num_streams={num_streams} must be a multiple of dp_size*num_workers={readers} "
                             f"(dp_size={dp_size}, num_workers={num_workers})")
        for manifest in manifests:
            if loss_tokens == "answer" and not manifest.has_answer_mask:
                raise ValueError(f"loss_tokens='answer' needs answer masks, but dataset {str(manifest.dir)!r} has none")
        if on_bad_shard not in ("error", "skip"):
            raise ValueError(f"on_bad_shard={on_bad_shard!r} is not allowed; allowed: 'error', 'skip'")
        if mixture is not None and one_pass:
            raise ValueError("a mixture is read for training only; evaluate each source's split on its own")
        self.packer = RowPacker(seq_length, int(manifests[0].tokenizer["pad_id"]), loss_tokens)
        state = dict(state or {})
        unknown = sorted(set(state) - {str(s) for s in range(num_streams)})
        if unknown:
            raise ValueError(f"state names streams {unknown}, but num_streams={num_streams} (ids 0..{num_streams - 1})")
        mine = [s for s in range(num_streams) if s % dp_size == dp_rank]  # another rank's streams are never read here
        options = dict(seed=seed, shuffle=shuffle_shards, one_pass=one_pass, on_bad_shard=on_bad_shard)
        if mixture is None:
            self.streams, self.start = _dataset_streams(manifests[0], split, mine, num_streams, state, options)
        else:
            self.streams, self.start = _mixture_streams(mixture, split, mine, num_streams, state, options)
        self.dp_size, self.num_workers, self.max_rows = dp_size, num_workers, max_rows

    def worker_of(self, stream: int) -> int:
        return (stream // self.dp_size) % max(self.num_workers, 1)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(self.num_workers, 1):
            raise RuntimeError(f"TrainRows was built for num_workers={self.num_workers} but runs in {workers} workers")
        mine = [s for s in self.streams if self.worker_of(s) == worker]
        per_stream = [self._rows_of(s) for s in mine]
        return heapq.merge(*per_stream, key=lambda item: item["index"])

    def _rows_of(self, stream: int):
        for index, row, state in self.streams[stream].rows(self.packer, self.start[stream], self.max_rows):
            yield {"index": index, "stream": stream, "row": row, "state": state}


def _unchanged(item):
    return item  # DataLoader collate_fn: keep numpy rows as they are (module level: picklable)


def _in_global_order(items, num_workers: int, worker_of):
    """Merge the DataLoader's round-robin output back into global row order.

    Each worker's rows arrive sorted; a row is released once every worker has one waiting, so the
    buffer stays about one row per worker when the stream states are level (as they are at global
    batch boundaries).
    """
    waiting = [deque() for _ in range(num_workers)]

    def pop_smallest():
        queue = min((q for q in waiting if q), key=lambda q: q[0]["index"])
        return queue.popleft()

    for item in items:
        waiting[worker_of(item["stream"])].append(item)
        while all(waiting):
            yield pop_smallest()
    while any(waiting):
        yield pop_smallest()


def _collate(items: list[dict], seq_length: int) -> MicroBatch:
    rows = [item["row"] for item in items]

    def joined(name, dtype):
        return torch.from_numpy(np.concatenate([getattr(r, name) for r in rows]).astype(dtype)).unsqueeze(0)

    bounds = [0] + [i * seq_length + int(b) for i, r in enumerate(rows) for b in r.cu_seqlens[1:]]
    states = {str(item["stream"]): item["state"] for item in items}  # later rows overwrite earlier
    return MicroBatch(
        tokens=joined("tokens", np.int64), labels=joined("labels", np.int64),
        loss_weight=joined("loss_weight", np.float32), position_ids=joined("position_ids", np.int64),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=int(np.diff(bounds).max()),
        num_rows=len(rows), stream_states=states, row_indices=[item["index"] for item in items],
    )


def _micro_batches(items, micro_batch_size: int, seq_length: int, keep_partial: bool):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == micro_batch_size:
            yield _collate(batch, seq_length)
            batch = []
    if batch and keep_partial:
        yield _collate(batch, seq_length)


def make_train_loader(dataset_dir, *, split: str = "train", seq_length: int, micro_batch_size: int, dp_rank: int,
                      dp_size: int, num_streams: int, num_workers: int, seed: int, shuffle_shards: bool = True,
                      loss_tokens: str = "all", on_bad_shard: str = "error", state: dict | None = None):
    """Endless iterator of this rank's MicroBatches (``micro_batch_size`` rows each), in global row order.

    ``dataset_dir``: one dataset (a directory or its Manifest), or a ``Mixture`` (data/mixture.py) whose every
    stream interleaves documents of its sources.

    ``state``: the merge of ``stream_states`` of every micro-batch consumed (all ranks); the rows
    that follow are then exactly those an uninterrupted run would have produced next.
    """
    _positive("micro_batch_size", micro_batch_size)
    dataset = TrainRows(dataset_dir, split=split, seq_length=seq_length, dp_rank=dp_rank, dp_size=dp_size,
                        num_streams=num_streams, num_workers=num_workers, seed=seed, shuffle_shards=shuffle_shards,
                        loss_tokens=loss_tokens, on_bad_shard=on_bad_shard, state=state)

    def batches():
        if num_workers == 0:
            items = iter(dataset)
        else:
            loader = DataLoader(dataset, num_workers=num_workers, batch_size=None, persistent_workers=True,
                                collate_fn=_unchanged)
            items = _in_global_order(iter(loader), num_workers, dataset.worker_of)
        yield from _micro_batches(items, micro_batch_size, seq_length, keep_partial=False)

    return batches()


def make_eval_loader(dataset_dir, *, split: str = "valid", seq_length: int, micro_batch_size: int, dp_rank: int,
                     dp_size: int, num_streams: int, max_rows: int, loss_tokens: str = "all"):
    """This rank's share of global rows ``0 .. max_rows - 1`` of ``split`` (one pass, unshuffled).

    Rows a stream cannot fill (it ran out of documents) are absent; the last micro-batch may be short.
    ``num_streams`` need not be a multiple of ``dp_size`` (a small split may have a single shard):
    a rank that owns no stream gets no micro-batch.
    """
    _positive("micro_batch_size", micro_batch_size)
    _positive("max_rows", max_rows)
    dataset = TrainRows(dataset_dir, split=split, seq_length=seq_length, dp_rank=dp_rank, dp_size=dp_size,
                        num_streams=num_streams, num_workers=0, shuffle_shards=False, loss_tokens=loss_tokens,
                        one_pass=True, max_rows=max_rows)
    return _micro_batches(iter(dataset), micro_batch_size, seq_length, keep_partial=True)
