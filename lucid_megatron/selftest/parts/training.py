"""The tiny model trained by real ``lucid train`` processes: bf16 (local and Transformer Engine specs) against
the same run in fp32 on the CPU.  The runs here are also what the resume and hf parts build on."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import time
from pathlib import Path

import yaml

from lucid_megatron.runtime.commands import process_command, train_command

from .base import Context, Part, Result, Status, passed_if

# What each size means: (GPU, --cpu-smoke)
TRAIN_STEPS = (30, 4)
TRAIN_SEQ = (256, 64)
# bf16 vs fp32 loss of the same step, relative (on CPU, tiny model, 30 steps: 4e-4; GPU kernels round more)
BF16_LOSS_TOLERANCE = 0.02
REFERENCE = "fp32-cpu"
UNINTERRUPTED = "bf16-local"  # the run resume and hf build on


@dataclasses.dataclass(kw_only=True)
class TrainRun(Result):
    """One ``lucid train`` process: its losses by step and, for a bf16 run, how far they are from fp32's."""

    run_dir: str
    device: str = ""
    exit_code: int | None = None
    seconds: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    max_rel_diff_vs_reference: float | None = None
    tolerance: float | None = None

    def row(self, name: str) -> str:
        losses = self.losses or [float("nan")]
        diff = "" if self.max_rel_diff_vs_reference is None else f"{self.max_rel_diff_vs_reference:.2e}"
        status = f"{self.status}: {self.reason[:90]}..." if self.reason else str(self.status)
        return (f"| {name} | {self.device} | {status} | {losses[0]:.4f} | {losses[-1]:.4f} | {diff} "
                f"| {'' if self.tolerance is None else self.tolerance} |")


@dataclasses.dataclass(kw_only=True)
class TrainingResult(Result):
    runs: dict[str, TrainRun]

    def markdown(self) -> str:
        if not self.runs:
            return ""
        lines = ["## b. training (tiny model) vs fp32 on CPU", "",
                 "| run | device | status | first loss | last loss | max rel. diff vs fp32 CPU | tolerance |",
                 "|---|---|---|---|---|---|---|"]
        return "\n".join(lines + [run.row(name) for name, run in self.runs.items()]) + "\n"


def train_config(ctx: Context) -> Path:
    """OUT/train.yaml: the tiny model on a synthetic retrieval set (written once into OUT/data)."""
    from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
    from lucid_megatron.data.tokenizer import ByteTokenizer

    data, seq = ctx.out / "data", TRAIN_SEQ[ctx.cpu_smoke]
    if not (data / "manifest.json").exists():
        write_synth_dataset(data, RetrievalTask(min_len=seq - seq // 4, max_len=seq, num_needles=1, num_queries=1),
                            train_docs=800, valid_docs=40, docs_per_shard=100, seed=0, tokenizer=ByteTokenizer())
    config = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "num_streams": 4, "num_workers": 0, "eval_rows": 8},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"warmup_fraction": 0.1, "decay": "cosine", "min_lr_ratio": 0.1},
        "train": {"steps": TRAIN_STEPS[ctx.cpu_smoke], "global_batch_size": 8, "micro_batch_size": 2,
                  "seq_length": seq, "zero_stage": 1},
        "logging": {"interval": 1, "progress": False},
    }
    path = ctx.out / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_lucid(arguments: list[str], log: Path, *, cpu_only: bool = False, timeout: float = 600) -> int:
    """``lucid ARGUMENTS`` as its own process, output to ``log``; its exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the fp32 reference runs on the CPU even on a GPU machine
    with open(log, "w") as f:
        return subprocess.run(process_command(arguments), stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout).returncode


def _losses(run_dir: Path) -> list[float]:
    """The training loss of every step metrics.jsonl holds, in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [by_step[step] for step in sorted(by_step)]


def train_run(ctx: Context, name: str, overrides: list[str], *, cpu_only: bool = False,
              resume: bool = False) -> TrainRun:
    """``lucid train`` of OUT/train.yaml into OUT/runs/NAME; SKIPPED where its layer spec cannot run here."""
    from lucid_megatron.runtime.parallelize import check_spec

    run_dir = ctx.out / "runs" / name
    spec = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.spec=")), "local")
    try:
        check_spec(spec)
    except ValueError as err:
        return TrainRun(status=Status.SKIPPED, reason=str(err), run_dir=str(run_dir))
    log = ctx.out / f"{name}{'-resume' if resume else ''}.log"
    started = time.monotonic()
    code = run_lucid(train_command(train_config(ctx), run_dir, overrides=overrides, resume="auto" if resume else None),
                     log, cpu_only=cpu_only)
    return TrainRun(status=passed_if(code == 0), reason="" if code == 0 else f"exit {code}, see {log.name}",
                    run_dir=str(run_dir), device="cpu" if cpu_only else str(ctx.device), exit_code=code,
                    seconds=round(time.monotonic() - started, 1), losses=_losses(run_dir))


def _against(run: TrainRun, reference: TrainRun) -> TrainRun:
    """``run`` with its largest relative loss difference from ``reference`` over the same steps."""
    pairs = list(zip(run.losses, reference.losses))
    finite = all(math.isfinite(a) for a, _ in pairs) and len(pairs) == len(reference.losses) > 0
    diff = max((abs(a - b) / abs(b) for a, b in pairs), default=float("inf"))
    ok = finite and diff <= BF16_LOSS_TOLERANCE
    return dataclasses.replace(run, status=passed_if(ok), max_rel_diff_vs_reference=diff,
                               tolerance=BF16_LOSS_TOLERANCE,
                               reason="" if ok else f"{len(pairs)} steps, largest difference {diff:.2e}")


def check_training(ctx: Context) -> TrainingResult:
    reference = train_run(ctx, REFERENCE, ["train.precision=fp32"], cpu_only=True)
    runs = {REFERENCE: reference}
    for name, spec in ((UNINTERRUPTED, "local"), ("bf16-te", "te")):
        run = train_run(ctx, name, ["train.precision=bf16", f"model.spec={spec}"])
        runs[name] = _against(run, reference) if run.status == Status.PASS else run
    failed = reference.status != Status.PASS or any(run.status == Status.FAIL for run in runs.values())
    return TrainingResult(status=passed_if(not failed), runs=runs)


def uninterrupted_run(ctx: Context) -> TrainRun | None:
    """The training part's bf16 local-spec run, if it trained (the resume and hf parts build on it)."""
    training = ctx.done.get("training")
    run = training.runs.get(UNINTERRUPTED) if isinstance(training, TrainingResult) else None
    return run if run is not None and run.status != Status.SKIPPED and run.losses else None


TRAINING = Part("training", f"the tiny model, {TRAIN_STEPS[0]} steps, world of one (NCCL on GPU): bf16 with the "
                "local spec and with the Transformer Engine spec (SKIPPED where it cannot be imported), each "
                f"within {BF16_LOSS_TOLERANCE:g} (relative, every step) of the same run in fp32 on the CPU.",
                check_training)
