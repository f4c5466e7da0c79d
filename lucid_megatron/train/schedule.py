"""Arithmetic of a run: how the world splits into TP x CP x DP, micro-batches per step, and the LR schedule."""

from __future__ import annotations

import dataclasses
import math

from lucid_megatron.config.schema import ConfigError
from lucid_megatron.config.train import TrainConfig


@dataclasses.dataclass
class RunLayout:
    """How the world splits: world = data_parallel x context_parallel x tensor_parallel."""

    world_size: int
    tensor_parallel: int
    context_parallel: int

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tensor_parallel * self.context_parallel)


def split_world(cfg: TrainConfig, world_size: int) -> RunLayout:
    """Split ``world_size`` processes into TP x CP x DP, refusing a world TP x CP does not divide or a global
    batch the data-parallel ranks cannot share in whole micro-batches; call before any process group starts."""
    tp, cp = cfg.parallel.tensor_parallel_size, cfg.parallel.context_parallel_size
    if world_size % (tp * cp):
        raise ConfigError(
            f"parallel: the world size ({world_size} processes) is not divisible by "
            f"tensor_parallel_size x context_parallel_size ({tp} x {cp})"
        )
    layout = RunLayout(world_size, tp, cp)
    dp, mbs, gbs = layout.data_parallel, cfg.train.micro_batch_size, cfg.train.global_batch_size
    if gbs % (mbs * dp):
        raise ConfigError(
            f"train.global_batch_size: {gbs} is not divisible by micro_batch_size x data_parallel "
            f"({mbs} x {dp}); data_parallel = {world_size} processes / (TP {tp} x CP {cp})"
        )
    return layout


def gradient_accumulation_steps(cfg: TrainConfig, layout: RunLayout) -> int:
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data_parallel)


# What defines the LR curve: the config field -> its key in state.json's ``lr_schedule`` record.
CURVE_FIELDS = {"optimizer.lr": "peak_lr", "train.steps": "total_steps",
                "schedule.warmup_fraction": "warmup_fraction", "schedule.decay": "decay",
                "schedule.min_lr_ratio": "min_lr_ratio"}


def config_value(cfg: TrainConfig, field: str):
    """The value of a dotted config field such as ``train.steps``."""
    section, key = field.split(".")
    return getattr(getattr(cfg, section), key)


def with_curve(cfg: TrainConfig, record: dict[str, object]) -> TrainConfig:
    """``cfg`` with the LR curve an ``lr_schedule`` record describes (to give the lr a checkpoint's run had)."""
    sections: dict[str, dict[str, object]] = {}
    for field, key in CURVE_FIELDS.items():
        section, name = field.split(".")
        sections.setdefault(section, {})[name] = record[key]
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)
                                       for section, values in sections.items()})


def warmup_steps(cfg: TrainConfig) -> int:
    return round(cfg.schedule.warmup_fraction * cfg.train.steps)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the decay."""
    peak, steps = cfg.optimizer.lr, cfg.train.steps
    warmup = warmup_steps(cfg)
    if step <= warmup:
        return peak * step / warmup
    floor = peak * cfg.schedule.min_lr_ratio
    progress = (step - warmup) / max(1, steps - warmup)
    if cfg.schedule.decay == "constant":
        return peak
    if cfg.schedule.decay == "linear":
        return floor + (peak - floor) * (1 - progress)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class LRSchedule:
    """The learning rate of each optimizer step, as a part of the run's saved state.

    The rate is a pure function of the step (:func:`lr_at`); the state is the last step a rate was given for,
    with what defines the curve: on resume the config decides the curve, and ``lucid train`` refuses one that
    differs from the record unless ``--allow-change`` names the field (validate.py, ``check_resume``).
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.last_step = 0

    def step(self) -> float:
        """Advance to the next optimizer step and return its learning rate."""
        self.last_step += 1
        return self.last_lr

    @property
    def last_lr(self) -> float:
        return lr_at(self.cfg, self.last_step)

    def state_dict(self) -> dict[str, object]:
        curve = {key: config_value(self.cfg, field) for field, key in CURVE_FIELDS.items()}
        return {"lr_schedule": {"step": self.last_step, **curve}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        saved = state.get("lr_schedule")
        # checkpoints from before the schedule recorded itself: it was at the checkpoint's step
        self.last_step = int(saved["step"] if isinstance(saved, dict) else state.get("step", 0))
