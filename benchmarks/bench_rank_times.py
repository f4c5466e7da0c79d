"""What gathering every rank's step times costs (train/step_times.py), as a share of the step time.

    python benchmarks/bench_rank_times.py [--config demo] [--steps 60] [--nproc 2]

Two parts, measured in one run of this script:

1. a real training run (``lucid train CONFIG --nproc-per-node N``, ``logging.interval=1``: the all-gather of
   the step times at every step, the worst case) whose metrics give the median step time and the median time
   of the gather itself (``rank_time/gather_s``, timed around it in the trainer);
2. the per-step bookkeeping on the host, timed in this process: one ``StepTimes.step()`` with its four
   sections and as many timed collectives as the run's steps have (two per micro-batch plus three), without
   the collectives themselves.

Overhead per step = bookkeeping + gather / logging.interval; printed for interval 1 and the default 10.  The
acceptance bar is 1% of the step time.  Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bookkeeping_s(collectives: int, repeats: int = 20000) -> float:
    """Host seconds of one step's StepTimes calls (CPU clock path: what every rank does per step)."""
    from lucid_megatron.train.step_times import StepTimes

    times = StepTimes(torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(repeats):
        with times.step():
            for name in ("data_wait", "compute", "optimizer", "checkpoint"):
                with times.section(name):
                    pass
            for _ in range(collectives):
                with times.collective():
                    pass
    return (time.perf_counter() - started) / repeats


def training_run(config: str, steps: int, nproc: int) -> list[dict]:
    from lucid_megatron.config.train import dump_config, load_train_config

    with tempfile.TemporaryDirectory() as root:
        run_dir = Path(root) / "run"
        cfg = load_train_config(config)
        cfg.final_eval = None  # only the training steps are measured
        if cfg.data.path is not None:
            cfg.data.path = str((REPO / cfg.data.path).resolve())
        config = Path(root) / "config.yaml"
        config.write_text(dump_config(cfg))
        command = [sys.executable, "-m", "lucid_megatron", "train", str(config), "--run-dir", str(run_dir),
                   "--nproc-per-node", str(nproc), "--set", f"train.steps={steps}", "--set", "logging.interval=1",
                   "--set", "logging.progress=false", "--set", "logging.eval_interval=0",
                   "--set", "data.eval_rows=0", "--set", "checkpoint.interval=0"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(command, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "rank_time/gather_s" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()

    from lucid_megatron.config.train import load_train_config

    cfg = load_train_config(args.config)
    micro_batches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * args.nproc)
    records = training_run(args.config, args.steps, args.nproc)[5:]  # the first steps warm up
    step_s = statistics.median(r["step_time_s"] for r in records)
    gather_s = statistics.median(r["rank_time/gather_s"] for r in records)
    per_step = bookkeeping_s(collectives=2 * micro_batches + 3)
    print(f"{args.config}: {args.nproc} processes, {micro_batches} micro-batch(es) per rank, "
          f"median of {len(records)} steps")
    print(f"  step time                {step_s * 1e3:9.3f} ms")
    print(f"  gather (per logged step) {gather_s * 1e3:9.3f} ms")
    print(f"  bookkeeping (per step)   {per_step * 1e6:9.3f} us")
    for interval in (1, 10):
        overhead = per_step + gather_s / interval
        print(f"  overhead at logging.interval={interval:<3d} {overhead * 1e3:7.3f} ms = {overhead / step_s:.3%} "
              "of the step time")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
