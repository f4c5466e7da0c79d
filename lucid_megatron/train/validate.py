"""Checks of a training config against its world, its dataset and the checkpoint it resumes, written once for both
callers: ``lucid train``'s preflight (before any process starts) and ``Trainer.setup`` (every rank; the only check
of a synthetic dataset written on first use).  Each raises ConfigError naming the config value at fault."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from lucid_megatron.checkpoint import read_model_config, read_state
from lucid_megatron.config.model import ModelConfig
from lucid_megatron.config.schema import ConfigError
from lucid_megatron.config.train import TrainConfig
from lucid_megatron.data.loader import check_stream_layout
from lucid_megatron.data.mixture import Mixture, open_mixture
from lucid_megatron.data.shards import MANIFEST, Manifest, read_manifest
from lucid_megatron.data.streams import Upsample
from lucid_megatron.data.tokenizer import tokenizer_mismatch

from .run_state import DataRecord
from .schedule import CURVE_FIELDS, RunLayout, config_value, lr_at, split_world, warmup_steps, with_curve

# the checks, in the order a run meets them: the world (schedule.py, it also splits it), then the dataset, then
# the checkpoint it resumes
__all__ = ["split_world", "open_dataset", "check_dataset", "check_vocabulary", "check_resume"]


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


# ---- resuming: the checkpoint's run against the config ------------------------------------------------------

# Fields that decide the shapes of the weights: a checkpoint loads only into the same values.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                "padded_vocab_size", "tie_embeddings")
# Model fields a resumed run may change: the layer implementation (both specs save the same checkpoint), the
# longest sequence allowed, and what only shapes a fresh model (its initialisation, the vocabulary padding's
# divisor: the padded size itself is a shape).  Every other field, today's and any added later, decides the
# function the weights compute (attention pattern, positions, norm, GQA, ...) and must stay.
FREE_MODEL_FIELDS = ("spec", "max_seq_len", "init_std", "make_vocab_size_divisible_by")
# What decides which rows the saved data positions point at, besides the sources themselves.
STREAM_ORDER_FIELDS = {"data.num_streams": "num_streams", "train.seed": "seed", "data.shuffle_shards": "shuffle_shards"}
# Fields --allow-change accepts: the LR curve, and the data read (the saved positions then go or stay).
ALLOWED_CHANGES = (*CURVE_FIELDS, "data.path", "data.sources")


@dataclasses.dataclass
class ResumePlan:
    """What a resume keeps and what it changes: the checkpoint's step, one line per change --allow-change let
    through (the trainer says them), and whether the data streams continue from the saved positions."""

    step: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    keep_data_positions: bool = True


def _model_value(model: ModelConfig, name: str):
    """A model field as the model uses it: num_kv_heads None is num_attention_heads, head_dim None is
    hidden_size / heads, and lucid_layers 'every:2' is the same pattern as [2, 4]."""
    if name == "num_kv_heads":
        return model.kv_heads
    if name == "head_dim":
        return model.kv_channels
    if name == "lucid_layers":
        return model.layer_is_lucid()
    return getattr(model, name)


def _differs(model: ModelConfig, saved: ModelConfig, name: str) -> bool:
    """Whether a field differs as the model uses it; a derived field left unset on both sides (head_dim None)
    follows the fields it derives from, which are named themselves."""
    if getattr(model, name) is None and getattr(saved, name) is None:
        return False
    return _model_value(model, name) != _model_value(saved, name)


def _new_run_hint(checkpoint: Path) -> str:
    return f"start a new run from these weights (--set checkpoint.init_from={checkpoint} and another --run-dir)"


def check_same_model(model: ModelConfig, checkpoint: Path, what: str = "--resume") -> None:
    """Refuse to load ``checkpoint`` into a model of other shapes, naming each field that differs."""
    saved = read_model_config(checkpoint, required=False)
    if saved is None:
        return  # checkpoints from before model.yaml was recorded: Megatron checks the shapes when loading
    differ = [f"model.{name}: config {getattr(model, name)!r}, checkpoint {getattr(saved, name)!r}"
              for name in SHAPE_FIELDS if _differs(model, saved, name)]
    if differ:
        remedy = ("resume with the run's own config.yaml, or start a new --run-dir (checkpoint.init_from needs the "
                  "same shapes too)" if what == "--resume" else "set these model fields to the checkpoint's values")
        raise ConfigError(
            f"{what}: {checkpoint} holds a model of other shapes than the config ({'; '.join(differ)}); {remedy}"
        )


def check_same_function(model: ModelConfig, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` into a model that computes another function (attention pattern,
    positions, norm, ...): every model field but FREE_MODEL_FIELDS, compared field by field."""
    saved = read_model_config(checkpoint, required=False)
    if saved is None:
        return
    names = [field.name for field in dataclasses.fields(ModelConfig) if field.name not in FREE_MODEL_FIELDS]
    differ = [f"model.{name}: checkpoint {getattr(saved, name)!r}, config {getattr(model, name)!r}"
              for name in names if _differs(model, saved, name)]
    if differ:
        raise ConfigError(
            f"--resume: {checkpoint} was trained with another model ({'; '.join(differ)}); a run keeps its model "
            f"on resume: resume with the checkpoint's values, or {_new_run_hint(checkpoint)}"
        )


def _check_tokenizer(state: dict, dataset: Manifest | Mixture, checkpoint: Path) -> None:
    saved = state.get("tokenizer")
    if not isinstance(saved, dict):
        return  # checkpoints from before the tokenizer was recorded
    manifest = dataset.sources[0].manifest if isinstance(dataset, Mixture) else dataset  # one tokenizer for all
    problem = tokenizer_mismatch(saved, manifest.tokenizer, a_is=f"the checkpoint {checkpoint} was trained with",
                                 b_is=f"the dataset {manifest.dir} was made with")
    if problem:
        raise ConfigError(f"--resume: {problem}; train on data made with the checkpoint's tokenizer, or "
                          f"{_new_run_hint(checkpoint)}")


def _describe_sources(sources: list[dict], weights_only: bool = False) -> str:
    if len(sources) == 1 and sources[0]["name"] is None:
        return f"{sources[0]['path']} [manifest sha256 {str(sources[0]['digest'])[:12]}]"
    if weights_only:
        return ", ".join(f"{source['name']} {source['weight']:g}" for source in sources)
    return ", ".join(f"{source['name']} {source['weight']:g} [{str(source['digest'])[:12]}]" for source in sources)


@dataclasses.dataclass
class _Change:
    """One field --allow-change may let through: what it says when refused, and when allowed."""

    field: str
    refusal: str
    note: str
    keeps_data_positions: bool = True


def _data_change(cfg: TrainConfig, state: dict, dataset: Manifest | Mixture, checkpoint: Path) -> _Change | None:
    """The data read differs from the checkpoint's record: other sources (their positions mean nothing here:
    dropped), or the same sources with other weights (a mixture continues where each source stopped)."""
    field = "data.sources" if cfg.data.sources else "data.path"
    old, new = state["dataset"]["sources"], DataRecord.of(cfg, dataset).sources

    def identity(sources):
        return [(source["name"], source["digest"], source["upsample"]) for source in sources]

    if identity(old) != identity(new):
        return _Change(
            field,
            refusal=(f"{field}: the data differs from what {checkpoint} was trained on (checkpoint "
                     f"{_describe_sources(old)}; config {_describe_sources(new)}); resume on the checkpoint's data, "
                     f"or pass --allow-change {field} to train on this data from its start (the saved data "
                     "positions are dropped)"),
            note=(f"{field}: {_describe_sources(old)} -> {_describe_sources(new)}: read from its start (the saved "
                  "data positions are dropped)"),
            keeps_data_positions=False,
        )
    if [source["weight"] for source in old] != [source["weight"] for source in new]:
        return _Change(
            field,
            refusal=(f"{field}: the weights differ from {checkpoint}'s (checkpoint {_describe_sources(old, True)}; "
                     f"config {_describe_sources(new, True)}); resume with the checkpoint's weights, or pass "
                     f"--allow-change {field} to continue with these (the saved data positions are kept: each "
                     "source continues where it stopped)"),
            note=(f"{field}: weights {_describe_sources(old, True)} -> {_describe_sources(new, True)}: each source "
                  "continues where it stopped (the saved data positions are kept)"),
        )
    return None


def _unrecorded_data(cfg: TrainConfig, checkpoint: Path) -> _Change:
    """``--allow-change data.*`` for a checkpoint written before the data was recorded: taken at its word."""
    field = "data.sources" if cfg.data.sources else "data.path"
    return _Change(field, refusal="", keeps_data_positions=False,
                   note=f"{field}: {checkpoint} does not record its data: read from its start as asked (the saved "
                        "data positions are dropped)")


def _check_stream_order(cfg: TrainConfig, state: dict, checkpoint: Path) -> None:
    """The saved positions hold only for the streams, seed and shard shuffling they were read with."""
    saved = state.get("dataset") if isinstance(state.get("dataset"), dict) else {}
    positions = [p for p in dict(state.get("data") or {}).values() if isinstance(p, dict)]
    if "num_streams" not in saved and positions:  # checkpoints from before the record: each position says it
        saved = {**saved, "num_streams": positions[0].get("num_streams")}
    for field, key in STREAM_ORDER_FIELDS.items():
        old, new = saved.get(key), config_value(cfg, field)
        if old is not None and old != new:
            raise ConfigError(
                f"--resume: {field}: checkpoint {old!r}, config {new!r}; the saved data positions of {checkpoint} "
                f"only hold for the stream order they were read in: resume with {field}={old}, or "
                f"{_new_run_hint(checkpoint)}"
            )


def _format_lr(lr: float) -> str:
    mantissa, exponent = f"{lr:.3e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _schedule_change(cfg: TrainConfig, state: dict, checkpoint: Path) -> list[_Change]:
    """The LR curve differs from the checkpoint's record: each changed field, with the lr of the next step."""
    saved = state["lr_schedule"]
    changed = [field for field, key in CURVE_FIELDS.items() if saved[key] != config_value(cfg, field)]
    if not changed:
        return []
    step = int(saved.get("step", state.get("step", 0))) + 1
    old_cfg = with_curve(cfg, saved)
    lr = f"the lr at step {step} {{}} {_format_lr(lr_at(cfg, step))} "
    lr += (f"(was {_format_lr(lr_at(old_cfg, step))})" if step <= old_cfg.train.steps else
           f"(the checkpoint's schedule ended at step {old_cfg.train.steps})")
    if step <= warmup_steps(cfg):
        lr += f", inside the new warmup (to step {warmup_steps(cfg)})"
    if step > cfg.train.steps:
        lr = f"the new schedule ends at step {cfg.train.steps}: nothing is left to train"
    values = ", ".join(f"{field}: {saved[CURVE_FIELDS[field]]!r} -> {config_value(cfg, field)!r}" for field in changed)
    refusal = (f"the LR schedule differs from {checkpoint}'s ({values}; {lr.format('would become')}); resume with "
               f"the checkpoint's values, or pass --allow-change {' '.join(changed)} to continue on the new schedule")
    return [_Change(field, refusal=refusal, note=f"{values}: {lr.format('becomes')}") for field in changed]


def _check_names(allow_change: Sequence[str]) -> None:
    unknown = [name for name in allow_change if name not in ALLOWED_CHANGES]
    if unknown:
        raise ConfigError(
            f"--allow-change: {unknown[0]} cannot change on resume; allowed: {', '.join(ALLOWED_CHANGES)} (a model "
            "field or the tokenizer: start a new run with checkpoint.init_from)"
        )


def _recorded(state: dict, key: str, keys: Sequence[str]) -> bool:
    """Whether state.json holds the record ``key`` with ``keys`` (checkpoints from before it was kept do not)."""
    record = state.get(key)
    return isinstance(record, dict) and all(name in record for name in keys)


def check_resume(cfg: TrainConfig, checkpoint: Path | None, dataset: Manifest | Mixture | None,
                 allow_change: Sequence[str] = ()) -> ResumePlan:
    """Refuse to resume ``checkpoint`` with a config that changes what defines the run: the model's shapes and
    function, the tokenizer, the data (sources, stream order) and the LR schedule, each compared with what the
    checkpoint records (a record it lacks is not compared).  The data and the LR schedule may change when
    ``allow_change`` names the field; the plan says what then changes.  ``dataset`` None (a synthetic dataset
    not written yet): the data is checked once it is.  ``checkpoint`` None (a fresh run): nothing may change."""
    _check_names(allow_change)
    if checkpoint is None:
        if allow_change:
            raise ConfigError("--allow-change: no checkpoint is resumed (a fresh run), so nothing can change; "
                              "drop --allow-change")
        return ResumePlan()
    state = read_state(checkpoint)
    if dataset is not None:  # first: another tokenizer also shows as another vocabulary size
        _check_tokenizer(state, dataset, checkpoint)
    check_same_model(cfg.model, checkpoint)
    check_same_function(cfg.model, checkpoint)
    changes, unknown = [], set()  # unknown: fields whose checkpoint value is not on record (or not readable yet)
    data_field = "data.sources" if cfg.data.sources else "data.path"
    if dataset is None:
        unknown.add(data_field)
    elif _recorded(state, "dataset", ["sources"]):
        changes += filter(None, [_data_change(cfg, state, dataset, checkpoint)])
    elif data_field in allow_change:
        changes.append(_unrecorded_data(cfg, checkpoint))
    if _recorded(state, "lr_schedule", CURVE_FIELDS.values()):
        changes += _schedule_change(cfg, state, checkpoint)
    else:
        unknown.update(CURVE_FIELDS)
    refused = [change for change in changes if change.field not in allow_change]
    if refused:
        raise ConfigError(f"--resume: {refused[0].refusal}")
    changed = {change.field for change in changes}
    unchanged = [name for name in allow_change if name not in changed | unknown]
    if unchanged:
        raise ConfigError(
            f"--allow-change: {unchanged[0]} is the same in {checkpoint} and the config, so there is nothing to "
            f"allow; fields that changed: {', '.join(sorted(changed)) or 'none'}"
        )
    keep = all(change.keeps_data_positions for change in changes)
    if keep:
        _check_stream_order(cfg, state, checkpoint)
    notes = list(dict.fromkeys(change.note for change in changes))  # a schedule's fields share one note
    return ResumePlan(int(state.get("step", 0)), notes, keep)
