"""Parallel layout: tensor (+ sequence) and context parallelism; data parallelism is what remains."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from .schema import ConfigError

if TYPE_CHECKING:
    from .model import ModelConfig


@dataclasses.dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    # "a2a": heads all-to-all (needs heads divisible by CP); "p2p": sequence-pipelined solve
    cp_comm_type: Literal["a2a", "p2p"] = "p2p"
    cp_sub_chunks: int = 1  # p2p pipeline units per zigzag chunk (shorter critical path, more messages)

    def validate(self) -> None:
        for name in ("tensor_parallel_size", "context_parallel_size", "cp_sub_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ConfigError(
                "sequence_parallel: needs tensor_parallel_size > 1 (it splits the sequence over TP ranks)"
            )


def check_model_fits(model: "ModelConfig", parallel: ParallelConfig) -> None:
    """Refuse layouts that cannot split this model, naming the values (ValueError)."""
    tp = parallel.tensor_parallel_size
    problems = []
    if model.num_attention_heads % tp:
        problems.append(f"num_attention_heads ({model.num_attention_heads}) is not divisible by tensor_parallel_size ({tp})")
    if model.kv_heads % tp:
        problems.append(f"num_kv_heads ({model.kv_heads}) is not divisible by tensor_parallel_size ({tp})")
    if model.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by tensor_parallel_size ({tp})")
    if model.make_vocab_size_divisible_by % tp:
        problems.append(
            f"make_vocab_size_divisible_by ({model.make_vocab_size_divisible_by}) is not divisible by "
            f"tensor_parallel_size ({tp}) (the padded vocabulary must split evenly and not depend on TP)"
        )
    cp = parallel.context_parallel_size
    if cp > 1 and parallel.cp_comm_type == "a2a" and not problems:
        try:
            check_a2a_heads(model.num_attention_heads // tp, model.kv_heads // tp, cp)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("model does not fit the parallel layout: " + "; ".join(problems))


def check_a2a_heads(num_heads: int, num_kv_heads: int, cp_size: int) -> None:
    """Raise a ValueError naming the head counts when ``a2a`` cannot split them over ``cp_size`` ranks (the one
    statement of this rule: the config check, the layer and the operator all call it)."""
    if num_heads % cp_size or (num_kv_heads % cp_size and cp_size % num_kv_heads):
        raise ValueError(
            f"cp_comm_type='a2a' splits heads over context-parallel ranks: the attention heads per TP rank "
            f"({num_heads}) must be divisible by context_parallel_size ({cp_size}), and the KV heads per TP "
            f"rank ({num_kv_heads}) must divide or be divisible by it; use cp_comm_type='p2p' instead"
        )
