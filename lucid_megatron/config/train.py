"""The training run's typed configuration: one YAML file, ``--set section.key=value`` overrides.

Sections: model, parallel, data, optimizer, schedule, train, checkpoint, logging, launch, final_eval.  Every
key is checked (unknown keys, wrong types, impossible combinations) before any process starts.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Literal

import yaml

from lucid_megatron.data.mqar import MqarTask
from lucid_megatron.data.synth import RetrievalTask

from .model import MODEL_PRESET_DIR, ModelConfig, model_preset_names
from .parallel import ParallelConfig, check_model_fits
from .schema import ConfigError, _short, from_dict, parse_yaml, read_yaml_file, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # training configs by name: a checkout only


@dataclasses.dataclass
class SynthConfig:
    """Generate the synthetic dataset at ``data.path`` when it does not exist yet: the retrieval ``task``, or
    multi-query associative recall when ``mqar`` is set (then ``task`` must be left out)."""

    task: RetrievalTask = dataclasses.field(default_factory=RetrievalTask)
    mqar: MqarTask | None = None
    train_docs: int = 20000
    valid_docs: int = 200
    docs_per_shard: int = 1000
    seed: int = 0

    def validate(self) -> None:
        if self.mqar is not None and self.task != RetrievalTask():
            raise ConfigError("task and mqar are both set: give one (mqar writes the MQAR dataset, task the "
                              "retrieval one)")
        for name in ("train_docs", "valid_docs", "docs_per_shard"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")


SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # it names metrics keys and TensorBoard tags


@dataclasses.dataclass
class UpsampleConfig:
    """Repeat a source's long documents: each document of at least ``min_tokens`` tokens is read ``factor``
    times per epoch of its source (spread over the epoch, see docs/data.md)."""

    min_tokens: int
    factor: int = 2

    def validate(self) -> None:
        if self.min_tokens < 1:
            raise ConfigError(f"min_tokens: must be >= 1, got {self.min_tokens}")
        if self.factor < 1:
            raise ConfigError(f"factor: must be an integer >= 1, got {self.factor}")


@dataclasses.dataclass
class SourceConfig:
    """One prepared dataset of a mixture: documents are drawn from it in proportion to ``weight``."""

    path: str
    weight: float = 1.0
    name: str | None = None  # default: the directory's name
    upsample: UpsampleConfig | None = None

    @property
    def label(self) -> str:
        return self.name if self.name is not None else Path(self.path).name

    def validate(self) -> None:
        if not self.weight >= 0:  # NaN fails too (the schema refuses it earlier, naming the key)
            raise ConfigError(f"weight: must be a number >= 0, got {self.weight!r}")
        if not SOURCE_NAME.fullmatch(self.label):
            raise ConfigError(f"name: {self.label!r} is not allowed (it names metrics); use letters, digits, "
                              "'_', '.' and '-' (set name: when the directory's name has other characters)")


@dataclasses.dataclass
class DataConfig:
    # dataset directory: manifest.json + webdataset shards (`lucid data synth|prepare`); or give `sources`
    path: str | None = None
    # a weighted mixture of prepared datasets instead of `path` (docs/data.md, "Mixtures")
    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    synth: SynthConfig | None = None
    loss_tokens: Literal["all", "answer"] = "all"
    num_streams: int = 8  # virtual streams; fixes the sample order for every DP/worker layout
    num_workers: int = 1
    shuffle_shards: bool = True
    on_bad_shard: Literal["error", "skip"] = "error"
    eval_rows: int = 64  # validation rows per evaluation (0: no validation); per source in a mixture

    def validate(self) -> None:
        if self.num_streams < 1:
            raise ConfigError(f"num_streams: must be >= 1, got {self.num_streams}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.eval_rows < 0:
            raise ConfigError(f"eval_rows: must be >= 0, got {self.eval_rows}")
        if (self.path is None) == (not self.sources):
            raise ConfigError("path: give either data.path (one dataset) or data.sources (a mixture), "
                              f"{'not both' if self.path is not None else 'one of them'}")
        if self.sources:
            self._validate_sources()

    def _validate_sources(self) -> None:
        if self.synth is not None:
            raise ConfigError("synth: writes the dataset at data.path; a mixture (data.sources) reads prepared "
                              "datasets only")
        labels = [source.label for source in self.sources]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ConfigError(f"sources: names {repeated} given more than once; set a distinct name: per source")
        if not any(source.weight > 0 for source in self.sources):
            raise ConfigError(f"sources: every weight is 0 ({', '.join(labels)}); at least one must be > 0")


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"eps must be > 0, weight_decay and grad_clip >= 0; got eps={self.eps}, "
                f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}"
            )


@dataclasses.dataclass
class ScheduleConfig:
    warmup_fraction: float = 0.0  # of train.steps, linear from 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optimizer.lr

    def validate(self) -> None:
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction: must be in [0, 1], got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


def parse_step_range(text: str) -> tuple[int, int]:
    """``"A-B"`` (or ``"A"``) -> (A, B); ValueError naming the text and the form otherwise."""
    first, _, last = str(text).partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"{text!r} is not a step range; write A-B, e.g. 10-12 (or one step: 10)") from None
    if not 1 <= a <= b:
        raise ValueError(f"{text!r}: the steps must satisfy 1 <= A <= B")
    return a, b


BF16_NEEDS_ZERO = (
    "precision: bf16 needs zero_stage >= 1: at stage 0 DeepSpeed accumulates the gradients in bf16 (1.8% loss "
    "error after 6 steps of the test model, against 2e-4 at stage 1, which keeps them in fp32 and costs no "
    "extra memory with one data-parallel rank)"
)


@dataclasses.dataclass
class TrainSection:
    steps: int
    global_batch_size: int  # rows (packed sequences of seq_length tokens) per optimizer step
    seq_length: int
    micro_batch_size: int = 1
    seed: int = 1234
    zero_stage: Literal[0, 1, 2, 3] = 1
    # bf16: bf16 weights and activations with fp32 master weights in DeepSpeed (also runs on CPU);
    # auto: bf16 on GPU, fp32 on CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    activation_checkpointing: bool = False
    # auto: the Triton kernels on GPU, the blockwise PyTorch operator on CPU
    attention_backend: Literal["auto", "triton", "blockwise", "reference"] = "auto"
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    # Save and exit after this step (like Megatron-LM's --exit-interval); continue with --resume auto.
    stop_at_step: int | None = None
    # A collective that waits longer than this fails, naming the rank and the phase (a hang becomes an error).
    collective_timeout_s: float = 600.0
    # A rank that has not moved to its next phase (data, step, save, ...) for this long writes its Python stacks
    # and its phase to its log and exits non-zero, so the job restarts (train/progress.py); null: no watchdog.
    hang_timeout_s: float | None = 1800.0
    # "A-B": write a torch.profiler trace of steps A to B per rank to RUN_DIR/profile/ (train/profiler.py)
    profile_steps: str | None = None
    # Start on a DeepSpeed version the checkpoint code was not checked against (runtime/deepspeed_adapter.py).
    allow_untested_deepspeed: bool = False

    def validate(self) -> None:
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ConfigError(BF16_NEEDS_ZERO)
        if not self.collective_timeout_s > 0:
            raise ConfigError(f"collective_timeout_s: must be > 0, got {self.collective_timeout_s}")
        if self.profile_steps is not None:
            try:
                parse_step_range(self.profile_steps)
            except ValueError as err:
                raise ConfigError(f"profile_steps: {err}") from None
        if self.hang_timeout_s is not None and not self.hang_timeout_s > 0:
            raise ConfigError(f"hang_timeout_s: must be > 0 or null (no watchdog), got {self.hang_timeout_s}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"stop_at_step: must be >= 1 or null, got {self.stop_at_step}")
        for name in ("steps", "global_batch_size", "seq_length", "micro_batch_size", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} is not divisible by "
                f"micro_batch_size ({self.micro_batch_size})"
            )


@dataclasses.dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (0: only at the end and on preemption)
    keep_last: int = 2
    init_from: str | None = None  # weights-only start (e.g. context extension from a 2K run)
    # Write checkpoints in the background (the step that saves only stages the state in host memory);
    # null: on GPUs yes, on CPU no (docs/training.md, "Checkpoints").
    async_save: bool | None = None

    def writes_in_background(self, device) -> bool:
        """Whether saves on ``device`` are asynchronous (``async_save``, or its default for the device)."""
        return self.async_save if self.async_save is not None else str(device).startswith("cuda")

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 1:
            raise ConfigError(
                f"interval must be >= 0 and keep_last >= 1; got interval={self.interval}, keep_last={self.keep_last}"
            )


@dataclasses.dataclass
class WandbConfig:
    """Also log the metrics to Weights & Biases (rank 0; the ``wandb`` extra).  Off when the section is absent."""

    project: str
    name: str | None = None  # the W&B run's display name; default: the run directory's name
    # offline: write the W&B run under RUN_DIR/wandb only (upload later with `wandb sync`); disabled: log nothing
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: str | None = None  # the W&B user or team; default: the account's default entity

    def validate(self) -> None:
        if not self.project.strip():
            raise ConfigError(f"project: must name a W&B project, got {self.project!r}")


@dataclasses.dataclass
class LoggingConfig:
    interval: int = 10  # steps between metric lines (metrics.jsonl, TensorBoard)
    eval_interval: int = 0  # steps between validation passes (0: only at the end)
    tensorboard: bool = True
    progress: bool = True
    # Every interval each rank's step time is gathered (train/step_times.py); a rank whose own work (its time
    # less what it waited for the others) exceeds this many times the median is named, with its host.
    straggler_factor: float = 1.5
    wandb: WandbConfig | None = None  # Weights & Biases beside TensorBoard (docs/training.md, "Logging")

    def validate(self) -> None:
        if self.interval < 1 or self.eval_interval < 0:
            raise ConfigError(
                f"interval must be >= 1 and eval_interval >= 0; got {self.interval}, {self.eval_interval}"
            )
        if not self.straggler_factor > 1:
            raise ConfigError(f"straggler_factor: must be > 1 (a multiple of the median), got {self.straggler_factor}")


@dataclasses.dataclass
class LaunchConfig:
    nproc_per_node: int = 1  # processes `lucid train` starts (through torchrun) when not under one
    # After forwarding SIGTERM to its workers, `lucid train` waits this long for them to save and exit,
    # then kills them (SIGKILL) and says so: a stuck worker cannot keep the job alive.
    stop_grace_s: float = 300.0
    # After a failure that is not a preemption (a worker crashed or hung), start the job again from its newest
    # checkpoint, at most this many times per launch (train/restarts.py); 0: never.
    max_restarts: int = 3
    # The same step failing this many times in a row is deterministic: stop instead of restarting.
    max_same_step_failures: int = 2
    # Seconds to wait before a restart (doubling after each one, at most 8x).
    restart_backoff_s: float = 10.0

    def validate(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"nproc_per_node: must be >= 1, got {self.nproc_per_node}")
        if not self.stop_grace_s > 0:
            raise ConfigError(f"stop_grace_s: must be > 0, got {self.stop_grace_s}")
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.max_same_step_failures < 1:
            raise ConfigError(f"max_same_step_failures: must be >= 1, got {self.max_same_step_failures}")
        if not self.restart_backoff_s >= 0:
            raise ConfigError(f"restart_backoff_s: must be >= 0, got {self.restart_backoff_s}")


@dataclasses.dataclass
class FinalEvalConfig:
    """After the last step, score retrieval on the final checkpoint (``lucid eval niah``, one process) and
    write RUN_DIR/eval/niah.json and niah.png.  Off when the section is absent."""

    lengths: list[int]  # context lengths, in tokens (each document has exactly one of them)
    num_samples: int = 50  # documents per length
    batch_size: int = 8  # documents per forward pass (the scores do not depend on it)
    seed: int = 0  # length n draws its documents from numpy's default_rng([seed, n])
    # What is asked; default: data.synth.task, the task trained on (min_len/max_len are not used)
    task: RetrievalTask | None = None

    def validate(self) -> None:
        if not self.lengths:
            raise ConfigError("lengths: give at least one context length, e.g. [512, 1024]")
        repeated = sorted({n for n in self.lengths if self.lengths.count(n) > 1})
        if repeated:
            raise ConfigError(f"lengths: {repeated} given more than once; each length is scored once")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig
    train: TrainSection
    data: DataConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    launch: LaunchConfig = dataclasses.field(default_factory=LaunchConfig)
    final_eval: FinalEvalConfig | None = None

    def final_eval_task(self) -> RetrievalTask | None:
        """The retrieval task final_eval asks: its own ``task``, else the synthetic data's (None: neither)."""
        if self.final_eval is None:
            return None
        trained = self.data.synth.task if self.data.synth is not None and self.data.synth.mqar is None else None
        return self.final_eval.task or trained

    def validate(self) -> None:
        try:
            check_model_fits(self.model, self.parallel)
        except ValueError as err:
            raise ConfigError(f"parallel.tensor_parallel_size: {err}") from None
        if self.train.seq_length > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_length: {self.train.seq_length} exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        tokens = self.train.micro_batch_size * self.train.seq_length
        if self.parallel.sequence_parallel and tokens % self.parallel.tensor_parallel_size:
            raise ConfigError(
                f"train.seq_length: micro_batch_size x seq_length ({tokens}) must be divisible by "
                f"tensor_parallel_size ({self.parallel.tensor_parallel_size}) with sequence_parallel"
            )
        if self.final_eval is not None:
            task = self.final_eval_task()
            if task is None:
                raise ConfigError(
                    "final_eval.task: required when data.synth is not set or writes MQAR (the retrieval task to "
                    "ask, e.g. {num_needles: 4, num_queries: 2}; score MQAR with lucid eval mqar)"
                )
            too_short = [n for n in self.final_eval.lengths if n < task.minimum_length()]
            if too_short:
                raise ConfigError(
                    f"final_eval.lengths: {too_short} cannot hold {task.num_needles} keys x {task.updates} "
                    f"assignments and {task.num_queries} queries; the minimum is {task.minimum_length()} tokens"
                )


# ---- loading ----------------------------------------------------------------------------------


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = parse_yaml(raw, f"--set {dotted}") if raw.strip() else None


def _resolve_model(model) -> dict:
    """``model: {preset: NAME, ...overrides}`` -> the preset's fields updated by the overrides."""
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping (a preset name and/or fields), got {_short(model)}")
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is None:
        return model
    path = MODEL_PRESET_DIR / f"{preset}.yaml"
    if not isinstance(preset, str) or not path.exists():
        raise ConfigError(f"model.preset: {preset!r} is not a preset; allowed: {', '.join(model_preset_names())}")
    base = read_yaml_file(path) or {}
    base.update(model)
    return base


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a training config must be a mapping of sections, got {_short(data)}")
    data = copy.deepcopy(data)
    for assignment in overrides:
        _apply_override(data, assignment)
    if "model" in data:
        data["model"] = _resolve_model(data["model"])
    return from_dict(TrainConfig, data)


def load_train_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML training config (a path, or a name in configs/ like ``demo``) plus overrides."""
    path = Path(path)
    if not path.exists() and not path.suffix and (CONFIG_DIR / f"{path}.yaml").exists():
        path = CONFIG_DIR / f"{path}.yaml"
    data = read_yaml_file(path)
    return config_from_dict({} if data is None else data, overrides)


def dump_config(cfg: TrainConfig) -> str:
    """The fully resolved config as YAML (model fields expanded, every default written out)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
