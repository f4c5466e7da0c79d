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
    # "a2a": heads all-to-all (needs heads divisible by CP); "p2p": sequence-pipelined solve;
    # "a2a+p2p": heads all-to-all inside groups of hierarchical_context_parallel_sizes[0] ranks (a node),
    # the sequence-pipelined solve across the hierarchical_context_parallel_sizes[1] groups
    cp_comm_type: Literal["a2a", "p2p", "a2a+p2p"] = "p2p"
    cp_sub_chunks: int = 1  # p2p pipeline units per zigzag chunk (shorter critical path, more messages)
    # a2a+p2p only: [a2a group size, number of groups], product = context_parallel_size (Megatron's name)
    hierarchical_context_parallel_sizes: list[int] | None = None

    def validate(self) -> None:
        for name in ("tensor_parallel_size", "context_parallel_size", "cp_sub_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_parallel_size == 1:
            raise ConfigError(
                "sequence_parallel: needs tensor_parallel_size > 1 (it splits the sequence over TP ranks)"
            )
        self._validate_hierarchy()

    def _validate_hierarchy(self) -> None:
        sizes, cp = self.hierarchical_context_parallel_sizes, self.context_parallel_size
        if self.cp_comm_type != "a2a+p2p":
            if sizes is not None:
                raise ConfigError(f"hierarchical_context_parallel_sizes: {sizes} is only used with "
                                  f"cp_comm_type='a2a+p2p' (got cp_comm_type={self.cp_comm_type!r}); remove it")
            return
        if cp == 1:
            return  # no context parallelism: nothing to split
        if sizes is None or len(sizes) != 2 or any(not isinstance(x, int) for x in sizes):
            raise ConfigError(f"hierarchical_context_parallel_sizes: cp_comm_type='a2a+p2p' needs [a2a group size, "
                              f"number of groups], two integers, e.g. [8, {max(1, cp // 8)}]; got {sizes}")
        a2a, groups = sizes
        if a2a * groups != cp:
            raise ConfigError(f"hierarchical_context_parallel_sizes: {sizes} multiplies to {a2a * groups}, not "
                              f"context_parallel_size ({cp})")
        if a2a == 1 or groups == 1:
            other = "p2p" if a2a == 1 else "a2a"
            raise ConfigError(f"hierarchical_context_parallel_sizes: {sizes} has a level of size 1, which is "
                              f"cp_comm_type={other!r} with extra steps; use cp_comm_type={other!r}")

    @property
    def a2a_group_size(self) -> int:
        """Ranks of one head all-to-all: all CP ranks (a2a), none (p2p), the first level (a2a+p2p)."""
        if self.context_parallel_size == 1 or self.cp_comm_type == "p2p":
            return 1
        if self.cp_comm_type == "a2a":
            return self.context_parallel_size
        return self.hierarchical_context_parallel_sizes[0]


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
    if cp > 1 and parallel.cp_comm_type in ("a2a", "a2a+p2p") and not problems:
        try:
            check_a2a_heads(model.num_attention_heads // tp, model.kv_heads // tp, parallel.a2a_group_size,
                            parallel.cp_comm_type)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("model does not fit the parallel layout: " + "; ".join(problems))


def check_a2a_heads(num_heads: int, num_kv_heads: int, a2a_size: int, cp_comm_type: str = "a2a") -> None:
    """Raise a ValueError naming the head counts when a head all-to-all cannot split them over ``a2a_size``
    ranks (the one statement of this rule: the config check, the layer and the operator all call it)."""
    if num_heads % a2a_size or (num_kv_heads % a2a_size and a2a_size % num_kv_heads):
        if cp_comm_type == "a2a":
            what = f"context_parallel_size ({a2a_size})"
            instead = "use cp_comm_type='p2p', or 'a2a+p2p' with an a2a group size the heads divide into"
        else:
            what = f"the a2a group size, hierarchical_context_parallel_sizes[0] ({a2a_size})"
            instead = "use a smaller a2a group (a divisor of both head counts) or cp_comm_type='p2p'"
        raise ValueError(
            f"cp_comm_type={cp_comm_type!r} splits heads over an all-to-all group: the attention heads per TP "
            f"rank ({num_heads}) must be divisible by {what}, and the KV heads per TP rank ({num_kv_heads}) "
            f"must divide or be divisible by it; {instead}"
        )
