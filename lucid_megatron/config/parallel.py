"""Parallel layout: tensor (+ sequence) and context parallelism; data parallelism is what remains."""

from __future__ import annotations

import dataclasses

from .schema import ConfigError


@dataclasses.dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1

    def validate(self) -> None:
        for name in ("tensor_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ConfigError(
                "sequence_parallel: needs tensor_parallel_size > 1 (it splits the sequence over TP ranks)"
            )
