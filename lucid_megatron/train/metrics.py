"""Rank-0 logging: metrics.jsonl, TensorBoard scalars, and a console progress line with ETA."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lucid_megatron.atomic import write_text as atomic_write_text

# metrics.jsonl key -> TensorBoard tag
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "valid_loss": "valid/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "tokens_per_s_per_gpu": "perf/tokens_per_s_per_gpu",
    "tflops_per_gpu": "perf/tflops_per_gpu",  # model FLOPs (model/flops.py)
    "hardware_tflops_per_gpu": "perf/hardware_tflops_per_gpu",  # with recomputation
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "memory_gib": "perf/memory_gib",
    "nonfinite_steps": "train/nonfinite_steps",
}
# per-source keys of a mixture ("tokens/web") -> TensorBoard tags ("data/tokens/web")
TENSORBOARD_PREFIXES = {
    "tokens/": "data/tokens/",
    "share/": "data/share/",
    "long_share/": "data/long_share/",
    "valid_loss/": "valid/loss/",
    "rank_time/": "perf/rank_time/",  # the slowest rank's own time, the median, the spread (train/step_times.py)
    "time/": "perf/time/",  # the median rank's step time by section
}


def tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not plotted)."""
    if key in TENSORBOARD_TAGS:
        return TENSORBOARD_TAGS[key]
    prefix = next((p for p in TENSORBOARD_PREFIXES if key.startswith(p)), None)
    return None if prefix is None else TENSORBOARD_PREFIXES[prefix] + key[len(prefix):]


def _per_source(values: dict, prefix: str) -> str:
    """``web 61% code 39%`` from the keys ``prefix + name``."""
    return " ".join(f"{key[len(prefix):]} {value:.0%}" for key, value in values.items() if key.startswith(prefix))


class MetricsLogger:
    """Writes only on the rank that has ``enabled=True`` (rank 0); every call is cheap elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, progress: bool,
                 total_steps: int, start_step: int, wandb=None):
        self.enabled = enabled
        self.wandb = wandb if enabled else None  # a WandbLogger (train/wandb_logger.py): W&B beside TensorBoard
        self.progress = progress and enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.monotonic()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard"
        self.writer = None
        if enabled:
            self._truncate_after(start_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.tb_dir), purge_step=start_step + 1)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint (they will be logged again), and any line
        that does not parse (a crash or a full disk mid-write tears the last one)."""
        if not self.path.exists():
            return
        keep, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                record_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                torn += int(bool(line.strip()))
                continue
            if record_step <= step:
                keep.append(line)
        if torn:
            print(f"lucid train: {self.path}: dropped {torn} unreadable line(s) (a write cut short)", flush=True)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def static(self, step: int, values: dict) -> None:
        """Run facts (world layout, ZeRO stage) as TensorBoard scalars."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"layout/{key}", value, step)
        if self.wandb is not None:
            self.wandb.static(step, values)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                tag = tensorboard_tag(key)
                if tag is not None and value is not None:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(step, values)
        if self.progress and "loss" in values:
            self._print_progress(step, values)
        elif self.progress and "valid_loss" in values:
            print(f"step {step}: validation loss {values['valid_loss']:.4f}", flush=True)

    def _print_progress(self, step: int, values: dict) -> None:
        done = step - self.start_step
        elapsed = time.monotonic() - self.start_time
        remaining = elapsed / max(done, 1) * (self.total_steps - step)
        width = 24
        filled = int(width * step / self.total_steps)
        bar = "#" * filled + "." * (width - filled)
        parts = [
            f"step {step}/{self.total_steps} [{bar}]",
            f"loss {values['loss']:.4f}",
            f"lr {values['lr']:.2e}",
        ]
        if values.get("grad_norm") is not None:
            parts.append(f"gnorm {values['grad_norm']:.3f}")
        parts.append(f"{values['tokens_per_s']:.0f} tok/s")
        if "tflops_per_gpu" in values:
            parts.append(f"{values['tflops_per_gpu']:.3g} TFLOP/s/GPU" +
                         (f" MFU {values['mfu']:.1%}" if "mfu" in values else ""))
        if "time/compute_s" in values:  # where the median rank's step went (train/step_times.py)
            sections = {"data": "time/data_wait_s", "compute": "time/compute_s", "optimizer": "time/optimizer_s",
                        "checkpoint": "time/checkpoint_s", "eval": "time/evaluation_s"}
            spent = {name: values.get(key, 0.0) for name, key in sections.items()}
            total = sum(spent.values()) or 1.0
            parts.append("time " + " ".join(f"{name} {value / total:.0%}" for name, value in spent.items()))
        if any(key.startswith("share/") for key in values):  # a mixture: each source's share of the tokens so far
            parts.append(f"mix {_per_source(values, 'share/')}")
        if any(key.startswith("long_share/") for key in values):
            parts.append(f"long-doc tokens {_per_source(values, 'long_share/')}")
        parts.append(f"ETA {_duration(remaining)}")
        print("  ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
