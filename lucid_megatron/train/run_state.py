"""The trainer's saved state through one seam: small parts that each save and load their own keys.

A checkpoint holds, besides the weights and the optimizer (``checkpoint/store.py`` writes every file)::

    state.json (rank 0 writes it; the same on every rank)
        step, nonfinite_steps   TrainProgress    how far the run is
        layout                  LayoutRecord     the layout it was saved with (decides how the optimizer loads)
        data                    DataPositions    where each data stream is, gathered from the ranks reading it
        tokenizer               TokenizerRecord  the dataset's tokenizer (converters and evaluators read it)
        lr_schedule             LRSchedule       the step it is at and the curve (schedule.py)
        dataset                 DataRecord       what the streams read (each source's manifest digest) and in
                                                 which order (num_streams, seed, shuffle_shards)
    rng/rank_K.pt (each rank its own)    RngStreams (checkpoint/store.py)

Every part has ``state_dict()`` / ``load_state_dict(state)`` (torchtitan's Stateful pattern); :class:`RunState`
merges the state.json parts into one dict and hands each the whole dict back on load.  A key a part does not
find (a checkpoint from before it existed) leaves it at its fresh value.  The records (layout, tokenizer,
dataset, the LR curve) are what ``lucid train`` compares with the config before a resume (validate.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable

import torch.distributed as dist

from lucid_megatron.checkpoint import RngStreams, Stateful
from lucid_megatron.config.train import TrainConfig
from lucid_megatron.data.loader import MicroBatch
from lucid_megatron.data.mixture import Mixture
from lucid_megatron.data.shards import MANIFEST, Manifest

from .schedule import LRSchedule, RunLayout

StreamState = dict[str, object]  # one data stream's position: epoch, shard, doc, offset, ... (data/streams.py; a
# mixture's holds its draw counter and each source's position, data/mixture.py)


@dataclasses.dataclass
class TrainProgress:
    """How far the run is: the last optimizer step done, and the steps whose loss was not finite."""

    step: int = 0
    nonfinite_steps: int = 0  # over the whole run, resumes included
    consecutive_nonfinite: int = 0  # the run of them ending at ``step``; not saved: a resumed run counts anew

    def record(self, step: int, nonfinite: bool) -> None:
        self.step = step
        self.nonfinite_steps += nonfinite
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if nonfinite else 0

    def state_dict(self) -> dict[str, object]:
        return {"step": self.step, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.step = int(state.get("step", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.consecutive_nonfinite = 0


def _all_gather(local: dict[str, StreamState]) -> list[dict[str, StreamState]]:
    gathered: list[dict[str, StreamState]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    return gathered


class DataPositions:
    """Where each data stream is: its state after the last row consumed.

    A rank advances only the streams it reads; saving gathers those from every rank over the positions the run
    was resumed from (collective), so a stream read by another rank is never saved from a stale copy.
    """

    def __init__(self, gather: Callable[[dict[str, StreamState]], list[dict[str, StreamState]]] = _all_gather):
        self.gather = gather
        self.restored: dict[str, StreamState] = {}  # every stream, as the resumed checkpoint had them
        self.advanced: dict[str, StreamState] = {}  # this rank's streams, since then

    def advance(self, micro_batches: Iterable[MicroBatch]) -> None:
        for micro_batch in micro_batches:  # in order: a later micro-batch's position wins
            self.advanced.update(micro_batch.stream_states)

    def state_dict(self) -> dict[str, object]:
        merged = dict(self.restored)
        for part in self.gather(self.advanced):
            merged.update(part)
        return {"data": merged}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.restored = dict(state.get("data", {}))
        self.advanced = {}

    def drop(self) -> None:
        """Forget the restored positions: the run reads other data from here, every stream from its start."""
        self.restored = {}


@dataclasses.dataclass
class LayoutRecord:
    """The layout this run trains on, and the one a resumed checkpoint was saved with."""

    current: dict[str, int]
    saved: dict[str, int] | None = None

    @classmethod
    def of(cls, layout: RunLayout, zero_stage: int) -> LayoutRecord:
        return cls({
            "world_size": layout.world_size, "tensor_parallel": layout.tensor_parallel,
            "context_parallel": layout.context_parallel, "data_parallel": layout.data_parallel,
            "zero_stage": zero_stage,
        })

    @property
    def same_as_saved(self) -> bool:
        """DeepSpeed's own optimizer files (and the per-rank RNG streams) load only into the same layout."""
        return self.saved == self.current

    def describe_change(self) -> str:
        return f"saved {self.saved}, now {self.current}"

    def state_dict(self) -> dict[str, object]:
        return {"layout": self.current}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.saved = state.get("layout")


@dataclasses.dataclass
class TokenizerRecord:
    """The dataset's tokenizer, recorded for whoever decodes the checkpoint's outputs (convert, eval)."""

    tokenizer: dict[str, object]

    def state_dict(self) -> dict[str, object]:
        return {"tokenizer": self.tokenizer}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Nothing to restore: the run's tokenizer is its dataset's (the manifest decides)."""


def manifest_digest(manifest: Manifest) -> str:
    """A dataset's identity: the SHA-256 of its manifest.json's content (shard names, document counts, tokenizer,
    source), as canonical JSON: the same wherever the directory is moved, however the file is indented."""
    content = json.loads((manifest.dir / MANIFEST).read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclasses.dataclass
class DataRecord:
    """What the data streams read and in which order, for the resume check (validate.py): the saved positions
    mean something only for the same sources, the same streams and the same shard order.

    ``sources``: per dataset its name (None for ``data.path``), directory, weight, upsampling and manifest digest.
    Empty when built without a dataset: then nothing is recorded.
    """

    sources: list[dict[str, object]] = dataclasses.field(default_factory=list)
    order: dict[str, object] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, cfg: TrainConfig, dataset: Manifest | Mixture) -> DataRecord:
        order = {"num_streams": cfg.data.num_streams, "seed": cfg.train.seed, "shuffle_shards": cfg.data.shuffle_shards}
        if not isinstance(dataset, Mixture):
            return cls([{"name": None, "path": str(dataset.dir), "weight": 1.0, "upsample": None,
                         "digest": manifest_digest(dataset)}], order)
        return cls([{"name": source.name, "path": str(source.manifest.dir), "weight": source.weight,
                     "upsample": None if source.upsample is None else dataclasses.asdict(source.upsample),
                     "digest": manifest_digest(source.manifest)} for source in dataset.sources], order)

    def state_dict(self) -> dict[str, object]:
        return {"dataset": {"sources": self.sources, **self.order}} if self.sources else {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Nothing to restore: the run reads its config's data (the resume check compares the two first)."""


@dataclasses.dataclass
class RunState:
    """Everything of the trainer a checkpoint restores besides the weights and the optimizer."""

    progress: TrainProgress
    data: DataPositions
    lr_schedule: LRSchedule
    layout: LayoutRecord
    tokenizer: TokenizerRecord
    dataset: DataRecord = dataclasses.field(default_factory=DataRecord)
    rng: RngStreams = dataclasses.field(default_factory=RngStreams)  # per rank: its own file, not state.json

    def _shared_parts(self) -> tuple[Stateful, ...]:
        # state.json's key order
        return (self.layout, self.data, self.progress, self.tokenizer, self.lr_schedule, self.dataset)

    def state_dict(self) -> dict[str, object]:
        """state.json's content (collective: the data positions are gathered from every rank)."""
        merged: dict[str, object] = {}
        for part in self._shared_parts():
            own = part.state_dict()
            overlap = merged.keys() & own.keys()
            assert not overlap, f"{type(part).__name__} writes keys another part owns: {sorted(overlap)}"
            merged.update(own)
        return merged

    def load_state_dict(self, state: dict[str, object]) -> None:
        for part in self._shared_parts():
            part.load_state_dict(state)
