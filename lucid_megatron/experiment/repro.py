"""The LUCID vs softmax reproduction: train every condition x seed with ``lucid train``, score each with
``lucid eval niah``, and aggregate mean and spread over seeds into a table and plots.

An experiment file names a base training config, the seeds, the evaluation, and the conditions as
``--set`` overrides of the base (so every condition is one plain ``lucid train`` command, printed in the
run's ``command.txt``).  Runs are resumable: a finished run (its ``niah.json`` exists) is not redone, an
interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from typing import Any, Optional

from lucid_megatron import atomic
from lucid_megatron.config.schema import load_spec_file
from lucid_megatron.runtime.commands import NiahOptions, niah_command, process_command, shell_text, train_command


@dataclasses.dataclass
class Experiment:
    base: Path  # the shared training config
    seeds: list[int]
    conditions: dict[str, list[str]]  # name -> "section.key=value" overrides of the base
    eval: dict  # the set fields of NiahOptions (`lucid eval niah` options): lengths, needles, ... num_samples, seed
    plots: dict[str, list[str]]  # plot name -> conditions drawn on it
    nproc_per_node: int = 1  # processes per training run (GPUs on a node; 1 on a CPU machine)
    title: str = "needle retrieval"  # names the task on the plots

    def train_arguments(self, condition: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
        """``lucid train`` of one condition and seed, resuming whatever the run dir already holds."""
        return train_command(self.base, run_dir, nproc_per_node=self.nproc_per_node, resume="auto",
                             overrides=[*self.conditions[condition], f"train.seed={seed}", *extra])

    def niah_arguments(self, run_dir: Path) -> list[str]:
        """``lucid eval niah`` of the run's latest checkpoint, into RUN_DIR/niah.json."""
        return niah_command(NiahOptions(**self.eval), checkpoints=[run_dir / "checkpoints"],
                            out=run_dir / "niah.json")


@dataclasses.dataclass
class ExperimentFile:
    """The schema of an experiment file (validated by ``config.schema.from_dict`` like every config)."""

    base: str  # the shared training config, relative to the experiment file
    seeds: list[int]
    conditions: dict[str, Optional[dict[str, Any]]]  # name -> {section.key: value} overrides of the base
    eval: NiahOptions
    plots: Optional[dict[str, list[str]]] = None  # plot name -> conditions drawn on it (default: all in one)
    nproc_per_node: int = 1
    title: str = "needle retrieval"

    def validate(self) -> None:
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of integers >= 0")
        if not self.conditions:
            raise ValueError("conditions must be a non-empty mapping of name -> overrides")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node!r} must be an integer >= 1")
        for name, members in (self.plots or {}).items():
            missing = [m for m in members if m not in self.conditions]
            if missing:
                raise ValueError(f"plots.{name} names unknown conditions {missing}; known: {sorted(self.conditions)}")


def _overrides(mapping: dict | None) -> list[str]:
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in (mapping or {}).items()]


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    spec = load_spec_file(path, ExperimentFile, "experiment file")
    base = (path.parent / spec.base).resolve()
    if not base.exists():
        raise FileNotFoundError(f"{path}: base config {str(base)!r} does not exist")
    conditions = {name: _overrides(sets) for name, sets in spec.conditions.items()}
    niah = {k: v for k, v in dataclasses.asdict(spec.eval).items() if v is not None}
    return Experiment(base=base, seeds=list(spec.seeds), conditions=conditions, eval=niah,
                      plots=spec.plots or {"all": list(conditions)}, nproc_per_node=spec.nproc_per_node,
                      title=spec.title)


def run_logged(run_dir: Path, commands: list[list[str]], *, threads: int, label: str, products=None) -> None:
    """Run ``lucid`` commands one after another in child processes, output appended to RUN_DIR/log.txt and the
    commands kept in RUN_DIR/command.txt; a command whose product (same order, optional) exists is skipped.  A
    failure raises RuntimeError naming ``label``, the command and the log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "command.txt", "".join(shell_text(arguments) + "\n" for arguments in commands))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(run_dir / "log.txt", "a") as log:
        for arguments, product in zip(commands, products or [None] * len(commands)):
            if product is not None and product.exists():
                continue
            code = subprocess.run(process_command(arguments), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode
            if code != 0:
                raise RuntimeError(f"{label}: `{shell_text(arguments)}` exited {code}; see {run_dir / 'log.txt'}")


def _run_one(exp: Experiment, condition: str, seed: int, out: Path, extra: list[str], threads: int) -> dict:
    """Train and evaluate one (condition, seed) unless already done; returns its niah results."""
    run_dir = out / "runs" / condition / f"seed{seed}"
    result_file = run_dir / "niah.json"
    if not result_file.exists():
        commands = [exp.train_arguments(condition, seed, run_dir, extra), exp.niah_arguments(run_dir)]
        run_logged(run_dir, commands, threads=threads, label=f"{condition} seed {seed}")
        print(f"experiment: {condition} seed {seed} done", flush=True)
    results = json.loads(result_file.read_text())
    by_length = next(iter(results["models"].values()))
    train_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in train_loss if "loss" in r]
    valid = [r["valid_loss"] for r in train_loss if "valid_loss" in r]
    # answer_loss is absent from results written before it was measured
    return {"exact_match": {int(n): r["exact_match"] for n, r in by_length.items()},
            "answer_loss": {int(n): r.get("answer_loss") for n, r in by_length.items()},
            "final_train_loss": losses[-1] if losses else None, "final_valid_loss": valid[-1] if valid else None}


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


METRICS = {"exact_match": ("exact match", "%"), "answer_loss": ("answer loss", "nats")}


def aggregate(per_run: dict[str, dict[int, dict]], lengths: list[int]) -> dict:
    """condition -> {metric: {length: {mean, std, per_seed}}} for exact match and answer loss (a metric the
    runs did not record is left out), plus the mean final validation loss."""
    summary = {}
    for condition, by_seed in per_run.items():
        entry = {}
        for metric in METRICS:
            if any(by_seed[s].get(metric, {}).get(n) is None for s in by_seed for n in lengths):
                continue
            row = {}
            for n in lengths:
                per_seed = [by_seed[s][metric][n] for s in sorted(by_seed)]
                mean, std = _mean_std(per_seed)
                row[n] = {"mean": mean, "std": std, "per_seed": per_seed}
            entry[metric] = row
        valid = [r["final_valid_loss"] for r in by_seed.values() if r["final_valid_loss"] is not None]
        summary[condition] = {**entry, "valid_loss": _mean_std(valid)[0] if valid else None, "seeds": sorted(by_seed)}
    return summary


def markdown_table(summary: dict, lengths: list[int], train_lengths: tuple[int, int]) -> str:
    """One table per metric: mean ± sample std over seeds per condition and evaluation length."""
    lo, hi = train_lengths
    head = ["condition", *[f"{n}{'*' if lo <= n <= hi else ''}" for n in lengths], "valid loss"]
    seeds = next(iter(summary.values()))["seeds"]
    parts = []
    for metric, (name, unit) in METRICS.items():
        rows = {c: s[metric] for c, s in summary.items() if metric in s}
        if not rows:
            continue
        lines = [f"**{name}** ({unit})\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for condition, row in rows.items():
            scale, digits = (100, 1) if unit == "%" else (1, 3)
            cells = [f"{scale * row[n]['mean']:.{digits}f} ± {scale * row[n]['std']:.{digits}f}" for n in lengths]
            loss = summary[condition]["valid_loss"]
            lines.append("| " + " | ".join([condition, *cells, f"{loss:.3f}" if loss is not None else "-"]) + " |")
        parts.append("\n".join(lines))
    parts.append(f"Mean ± sample std over seeds {seeds}; * = inside the training length range [{lo}, {hi}].")
    return "\n\n".join(parts) + "\n"


def plot_group(summary: dict, members: list[str], lengths: list[int], path: Path, title: str,
               metric: str = "exact_match") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name, unit = METRICS[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    for condition in members:
        row = summary[condition][metric]
        ax.errorbar(lengths, [row[n]["mean"] for n in lengths], yerr=[row[n]["std"] for n in lengths],
                    marker="o", capsize=3, label=condition, linestyle="--" if "softmax" in condition else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"{name} (mean ± std over seeds)" + (", nats" if unit == "nats" else ""))
    if metric == "exact_match":
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)


def run_experiment(exp: Experiment, out: Path, *, jobs: int = 2, only: list[str] | None = None,
                   seeds: list[int] | None = None, extra: list[str] | None = None,
                   eval_overrides: dict | None = None) -> dict:
    """Run (or finish) every selected condition x seed, then write results.json, table.md and the plots."""
    from lucid_megatron.config.train import load_train_config
    from lucid_megatron.data.synth import ensure_synth_dataset

    unknown = [c for c in only or [] if c not in exp.conditions]
    if unknown:
        raise ValueError(f"--only: unknown conditions {unknown}; known: {sorted(exp.conditions)}")
    if jobs < 1:
        raise ValueError(f"--jobs={jobs}: must be >= 1")
    conditions = only or list(exp.conditions)
    seeds = seeds or exp.seeds
    extra = list(extra or [])
    exp = dataclasses.replace(exp, eval={**exp.eval, **(eval_overrides or {})})
    out.mkdir(parents=True, exist_ok=True)

    # Every condition reads the same dataset: write it once here, before runs start in parallel.
    cfg = load_train_config(exp.base, extra)
    ensure_synth_dataset(cfg.data, say=lambda text: print(f"experiment: {text}", flush=True))
    threads = max(1, (os.cpu_count() or 1) // (jobs * exp.nproc_per_node))
    work = [(c, s) for c in conditions for s in seeds]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {key: pool.submit(_run_one, exp, *key, out, extra, threads) for key in work}
        per_run: dict[str, dict[int, dict]] = {}
        for (condition, seed), future in futures.items():
            per_run.setdefault(condition, {})[seed] = future.result()

    lengths = sorted(int(n) for n in exp.eval["lengths"])
    summary = aggregate(per_run, lengths)
    task = cfg.data.synth.task if cfg.data.synth else None
    train_lengths = (task.min_len, task.max_len) if task else (cfg.train.seq_length, cfg.train.seq_length)
    atomic.write_text(out / "results.json", json.dumps(
        {"experiment": {"base": str(exp.base), "seeds": seeds, "conditions": {c: exp.conditions[c] for c in conditions},
                        "eval": exp.eval, "extra_overrides": extra, "train_lengths": train_lengths},
         "summary": {c: {k: ({str(n): v for n, v in value.items()} if k in METRICS else value)
                         for k, value in s.items()} for c, s in summary.items()}}, indent=1))
    table = markdown_table(summary, lengths, train_lengths)
    atomic.write_text(out / "table.md", table)
    for name, members in exp.plots.items():
        for metric in METRICS:
            drawn = [m for m in members if metric in summary.get(m, {})]
            if drawn:
                suffix = "" if metric == "exact_match" else "-loss"
                plot_group(summary, drawn, lengths, out / f"{name}{suffix}.png", f"{exp.title}: {name}", metric)
    print(table, flush=True)
    return summary
