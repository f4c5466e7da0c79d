"""The GPU acceptance run: everything the CPU tests cannot prove, in one call on one GPU.

    python -m lucid_megatron selftest gpu --out DIR               # one H100/H200, about 8 minutes
    python -m lucid_megatron selftest gpu --out DIR --cpu-smoke   # the same code paths, toy sizes, CPU

The parts, in the order they run (selftest/parts/; each records its numbers even when a later one fails):

{parts}

It installs nothing: on a GPU image without this project's dependencies, carry their wheels (docs/training.md,
"Running on GPUs"). Writes ``DIR/results.json`` and ``DIR/results.md`` after every part.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from lucid_megatron import atomic

from .parts.base import Context, Part, Result, Status
from .parts.hf import HF
from .parts.kernels import KERNELS, NUMERICS
from .parts.resume import RESUME
from .parts.timings import TIMINGS, TUNING
from .parts.training import TRAINING

PARTS: tuple[Part, ...] = (KERNELS, NUMERICS, TRAINING, RESUME, HF, TIMINGS, TUNING)
Header = dict[str, str | float | bool | None]  # date, mode, device, versions; seconds and complete at the end


def describe(parts: tuple[Part, ...]) -> str:
    """One entry per part: its name (its key in results.json), then what it proves."""
    width = max(len(p.name) for p in parts) + 2
    return "\n".join(textwrap.fill(p.summary, 110, initial_indent=p.name.ljust(width),
                                   subsequent_indent=" " * width) for p in parts)


if __doc__:  # (None under python -OO) the list is the code's, so it cannot drift
    __doc__ = __doc__.format(parts=describe(PARTS))


class Report:
    """results.json + results.md, rewritten after every part so that a run cut short still reports."""

    def __init__(self, out: Path, header: Header):
        self.out, self.header = out, header
        self.results: dict[str, Result] = {}

    def record(self, name: str, result: Result) -> None:
        self.results[name] = result
        self.write()
        print(f"[selftest] {name}: {result.status}" + (f" ({result.reason})" if result.reason else ""), flush=True)

    def write(self) -> None:
        data = {"header": self.header, "parts": {n: r.to_json() for n, r in self.results.items()}}
        atomic.write_text(self.out / "results.json", json.dumps(data, indent=1, default=str))
        atomic.write_text(self.out / "results.md", self.markdown())

    def failed(self) -> list[str]:
        return [name for name, r in self.results.items() if r.status == Status.FAIL]

    def markdown(self) -> str:
        h = self.header
        lines = [f"# lucid selftest gpu — {h['date']} | {h['device']} | torch {h['torch']} | triton {h['triton']}",
                 f"mode: {h['mode']}", ""]
        for name, result in self.results.items():
            section = result.markdown()
            if not section and result.status != Status.PASS:  # a part without numbers still says why
                section = f"## {name}: {result.status} ({result.reason})\n"
            if section:
                lines.append(section)
        failed = self.failed()
        lines.append("overall: " + (f"FAIL ({', '.join(failed)})" if failed else "PASS"))
        return "\n".join(lines) + "\n"


def _header(cpu_smoke: bool) -> Header:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "mode": "cpu-smoke" if cpu_smoke else "gpu",
            "device": "CPU" if cpu_smoke else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton_version, "python": sys.version.split()[0]}


def run_selftest(out: str | Path, *, cpu_smoke: bool = False, budget_s: float = 420.0) -> int:
    """Every part in order, each result recorded as it comes; 1 if any part failed."""
    import torch

    started = time.monotonic()
    if not cpu_smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: run on a GPU machine, or pass --cpu-smoke")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if cpu_smoke else torch.device("cuda", 0)
    ctx = Context(out=out, device=device, cpu_smoke=cpu_smoke, started=started, budget_s=budget_s)
    report = Report(out, _header(cpu_smoke))
    for part in PARTS:
        ctx.done[part.name] = part.run(ctx)
        report.record(part.name, ctx.done[part.name])
    report.header.update(seconds=round(time.monotonic() - started, 1), complete=True)
    report.write()
    print((out / "results.md").read_text())
    return 1 if report.failed() else 0
