"""The ``lucid train`` and ``lucid eval niah | mqar`` argument lists, built in one place.

Everything that starts one of these commands (the torchrun starter, the experiments, the GPU selftest,
final_eval, the tests) builds its list here, so an option renamed in a ``cli.py`` is renamed here once.
The builders return the arguments after ``lucid``; ``process_command`` and ``torchrun_command`` turn them
into the command line of a process running this interpreter, and ``shell_text`` into what a user would type.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: importing lucid_megatron.data loads torch, which building a command needs not
    from lucid_megatron.data.synth import RetrievalTask

PathLike = str | Path


def process_command(arguments: Sequence[str]) -> list[str]:
    """``python -m lucid_megatron ARGUMENTS`` with this interpreter, so the child sees the same environment."""
    return [sys.executable, "-m", "lucid_megatron", *map(str, arguments)]


def torchrun_command(nproc_per_node: int, arguments: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N -m lucid_megatron ARGUMENTS`` with this interpreter (through
    runtime/elastic_agent.py, which records a failed worker's rank and exit code for the restart supervisor)."""
    return [sys.executable, "-m", "lucid_megatron.runtime.elastic_agent", "--standalone",
            f"--nproc-per-node={nproc_per_node}", "-m", "lucid_megatron", *map(str, arguments)]


def shell_text(arguments: Sequence[str]) -> str:
    """``lucid ARGUMENTS`` as one would type it (quoted for a POSIX shell): for messages and command files."""
    return shlex.join(["lucid", *map(str, arguments)])


def override_arguments(assignments: Sequence[str]) -> list[str]:
    """``--set SECTION.KEY=VALUE`` once per assignment."""
    return [word for assignment in assignments for word in ("--set", assignment)]


def train_command(config: PathLike, run_dir: PathLike, *, overrides: Sequence[str] = (), resume: str | None = None,
                  nproc_per_node: int | None = None, allow_change: Sequence[str] = ()) -> list[str]:
    """``lucid train`` of ``config`` into ``run_dir``: ``resume`` is 'auto' or a checkpoint path;
    ``nproc_per_node`` None leaves the count to the config (launch.nproc_per_node); ``allow_change`` names the
    fields a resume may change (the LR schedule, the data)."""
    arguments = ["train", str(config), "--run-dir", str(run_dir)]
    if nproc_per_node is not None:
        arguments += ["--nproc-per-node", str(nproc_per_node)]
    if resume:
        arguments += ["--resume", str(resume)]
    if allow_change:
        arguments += ["--allow-change", *allow_change]
    return arguments + override_arguments(overrides)


@dataclasses.dataclass(frozen=True)
class NiahOptions:
    """What ``lucid eval niah`` asks: the lengths, the task and the sampling; None keeps the command's default.

    Also the schema of an experiment file's ``eval:`` section (validated by ``config.schema.from_dict``).
    """

    lengths: list[int]
    needles: int | None = None
    queries: int | None = None
    updates: int | None = None
    key_len: int | None = None
    value_len: int | None = None
    key_vocab: int | None = None
    value_vocab: int | None = None
    template: str | None = None
    filler_words: int | None = None
    num_samples: int | None = None
    seed: int | None = None
    batch_size: int | None = None

    def validate(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths={self.lengths!r} must be a non-empty list of positive integers")

    @classmethod
    def of_task(cls, task: RetrievalTask, lengths: Sequence[int], *, num_samples: int, batch_size: int,
                seed: int) -> NiahOptions:
        """Every field of ``task`` spelled out (none left to the command's defaults); documents of ``lengths``."""
        return cls(lengths=list(lengths), needles=task.num_needles, queries=task.num_queries, updates=task.updates,
                   key_len=task.key_len, value_len=task.value_len, key_vocab=task.key_vocab,
                   value_vocab=task.value_vocab, template=task.template, filler_words=task.filler_words,
                   num_samples=num_samples, seed=seed, batch_size=batch_size)

    def arguments(self) -> list[str]:
        return _option_arguments(self)


def _option_arguments(options) -> list[str]:
    """The options' command-line words: the first field's list (lengths, pairs), then ``--name value`` for
    every other field that is set."""
    first, *rest = dataclasses.fields(options)
    arguments = [f"--{first.name}", *map(str, getattr(options, first.name))]
    for field in rest:
        value = getattr(options, field.name)
        if value is not None:
            arguments += [f"--{field.name.replace('_', '-')}", str(value)]
    return arguments


@dataclasses.dataclass(frozen=True)
class MqarOptions:
    """What ``lucid eval mqar`` asks: the numbers of pairs, the task and the sampling; None keeps the command's
    default.  Also the schema of an experiment file's ``eval_mqar:`` section."""

    pairs: list[int]
    key_vocab: int | None = None
    value_vocab: int | None = None
    updates: int | None = None
    num_samples: int | None = None
    seed: int | None = None
    batch_size: int | None = None

    def validate(self) -> None:
        if not self.pairs or any(n < 1 for n in self.pairs):
            raise ValueError(f"pairs={self.pairs!r} must be a non-empty list of positive integers")

    def arguments(self) -> list[str]:
        return _option_arguments(self)


def niah_command(options: NiahOptions | MqarOptions, *, checkpoints: Sequence[PathLike] = (), hf: Sequence[PathLike] = (),
                 labels: Sequence[str] = (), out: PathLike | None = None, plot: PathLike | None = None,
                 tensor_parallel_size: int = 1, context_parallel_size: int = 1,
                 cp_comm_type: str | None = None) -> list[str]:
    """``lucid eval niah`` of the Megatron ``checkpoints`` then the Hugging Face ``hf`` directories (``labels``
    name them in that order), asking ``options``; results to ``out`` (JSON) and ``plot`` (PNG) when given.
    With ``MqarOptions``, ``lucid eval mqar`` of the same."""
    arguments = ["eval", "mqar" if isinstance(options, MqarOptions) else "niah"]
    arguments += [word for path in checkpoints for word in ("--checkpoint", str(path))]
    arguments += [word for path in hf for word in ("--hf", str(path))]
    arguments += [word for label in labels for word in ("--label", label)]
    arguments += options.arguments()
    if tensor_parallel_size != 1:
        arguments += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if context_parallel_size != 1:
        arguments += ["--context-parallel-size", str(context_parallel_size)]
    if cp_comm_type is not None:
        arguments += ["--cp-comm-type", cp_comm_type]
    if out is not None:
        arguments += ["--out", str(out)]
    if plot is not None:
        arguments += ["--plot", str(plot)]
    return arguments
