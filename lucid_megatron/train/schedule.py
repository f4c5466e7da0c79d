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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then the decay."""
    peak, steps = cfg.optimizer.lr, cfg.train.steps
    warmup = round(cfg.schedule.warmup_fraction * steps)
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
    with what defines the curve, for the record: on resume the config decides the curve (train.steps may grow).
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
        schedule = self.cfg.schedule
        return {"lr_schedule": {
            "step": self.last_step, "peak_lr": self.cfg.optimizer.lr, "total_steps": self.cfg.train.steps,
            "warmup_fraction": schedule.warmup_fraction, "decay": schedule.decay,
            "min_lr_ratio": schedule.min_lr_ratio,
        }}

    def load_state_dict(self, state: dict[str, object]) -> None:
        saved = state.get("lr_schedule")
        # checkpoints from before the schedule recorded itself: it was at the checkpoint's step
        self.last_step = int(saved["step"] if isinstance(saved, dict) else state.get("step", 0))
