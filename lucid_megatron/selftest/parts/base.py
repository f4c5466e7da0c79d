"""What every part of the GPU selftest shares: one status type, a result that renders itself, the context."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Status(str, enum.Enum):
    """How a part (or one run inside it) ended; a str, so results.json holds the plain word."""

    PASS = "PASS"
    FAIL = "FAIL"
    SKIPPED = "SKIPPED"  # could not run here (e.g. Transformer Engine missing): the reason says why

    def __str__(self) -> str:  # the plain word in messages and tables too (f-strings format with str here)
        return self.value


@dataclasses.dataclass(kw_only=True)
class Result:
    """A status and, unless it passed, the reason: why it failed or was skipped."""

    status: Status
    reason: str = ""

    def markdown(self) -> str:
        """This result's section of results.md; empty when it has no numbers to show."""
        return ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def failed(reason: str) -> Result:
    return Result(status=Status.FAIL, reason=reason)


def passed_if(ok: bool) -> Status:
    return Status.PASS if ok else Status.FAIL


@dataclasses.dataclass
class Context:
    """What the parts run with: where to write, on which device, at which sizes, until when, and the results of
    the parts that ran before (a part that builds on another, such as resume on training, reads it here)."""

    out: Path
    device: torch.device
    cpu_smoke: bool
    started: float  # time.monotonic() when the selftest started
    budget_s: float  # seconds for the whole run: the timings stop early once it is spent
    done: dict[str, Result] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Part:
    """One check of the selftest: its key in results.json, what it proves (one line, listed in selftest/gpu.py's
    docstring) and the function that runs it."""

    name: str
    summary: str
    check: Callable[[Context], Result]

    def run(self, ctx: Context) -> Result:
        try:
            return self.check(ctx)
        except Exception as err:  # noqa: BLE001 - record and go on: later parts still report
            return failed(f"{type(err).__name__}: {err}")
