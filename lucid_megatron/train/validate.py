"""Checks of a training config against its world and its dataset, written once for both callers: ``lucid train``'s
preflight (before any process starts) and ``Trainer.setup`` (every rank; the only check of a synthetic dataset
written on first use).  Each raises ConfigError naming the config value at fault."""

from __future__ import annotations

from lucid_megatron.config.schema import ConfigError
from lucid_megatron.config.train import TrainConfig
from lucid_megatron.data.loader import check_stream_layout
from lucid_megatron.data.mixture import Mixture, open_mixture
from lucid_megatron.data.shards import MANIFEST, Manifest, read_manifest
from lucid_megatron.data.streams import Upsample

from .schedule import RunLayout, split_world

# the checks, in the order a run meets them: the world (schedule.py, it also splits it), then the dataset
__all__ = ["split_world", "open_dataset", "check_dataset", "check_vocabulary"]


def open_dataset(cfg: TrainConfig) -> Manifest | Mixture:
    """What the run reads: ``data.path``'s manifest, or the mixture of ``data.sources`` (their manifests read, one
    tokenizer checked).  A missing ``data.path`` raises FileNotFoundError; a source that is missing or does not
    fit the others, ConfigError naming it."""
    if not cfg.data.sources:
        return read_manifest(cfg.data.path)
    specs = []
    for i, source in enumerate(cfg.data.sources):
        try:
            manifest = read_manifest(source.path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.sources[{i}].path ({source.label}): {err}") from None
        upsample = None if source.upsample is None else Upsample(source.upsample.min_tokens, source.upsample.factor)
        specs.append((source.label, manifest, source.weight, upsample))
    try:
        return open_mixture(specs)
    except ValueError as err:
        raise ConfigError(f"data.sources: {err}") from None


def check_dataset(cfg: TrainConfig, dataset: Manifest | Mixture, layout: RunLayout) -> None:
    """The dataset fits the run: the train loader can serve this layout, and the vocabulary holds its tokens.
    A mixture is checked source by source (each deals its own shards to the streams)."""
    manifests = [source.manifest for source in dataset.sources] if isinstance(dataset, Mixture) else [dataset]
    for i, manifest in enumerate(manifests):
        where = "data" if len(manifests) == 1 and not cfg.data.sources else f"data.sources[{i}]"
        try:
            check_stream_layout(manifest, cfg.data.num_streams, layout.data_parallel, cfg.data.num_workers,
                                cfg.train.global_batch_size)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        if cfg.data.sources and cfg.data.loss_tokens == "answer" and not manifest.has_answer_mask:
            raise ConfigError(f"data.loss_tokens: 'answer' needs answer masks, but {where} ({manifest.dir}) has none")
    check_vocabulary(cfg, manifests[0])  # a mixture's sources share one tokenizer (open_dataset checks it)


def check_vocabulary(cfg: TrainConfig, manifest: Manifest) -> None:
    """Every token id of the dataset's tokenizer has a row in the model's embedding."""
    tokens = manifest.tokenizer["vocab_size"]
    if tokens > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the dataset tokenizer's {tokens} tokens "
            f"({manifest.dir / MANIFEST})"
        )
