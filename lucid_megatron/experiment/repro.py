"""The LUCID vs softmax reproduction: train every condition x seed with ``lucid train``, score each with
``lucid eval niah`` (``eval:``) or ``lucid eval mqar`` (``eval_mqar:``), and aggregate mean and spread over
seeds into tables, per-seed JSON and one figure per plot (the metrics at each evaluation point, the
validation answer loss by step, and for key update the exact match by times the queried key was assigned).

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
from lucid_megatron.runtime.commands import (MqarOptions, NiahOptions, niah_command, process_command, shell_text,
                                             train_command)


@dataclasses.dataclass
class Task:
    """One task of an experiment: what its runs change in the base config and how they are scored."""

    name: str  # "" for a file without ``tasks:`` (its runs and outputs sit directly in --out)
    title: str  # names the task on the plots
    overrides: list[str]  # "section.key=value" overrides of the base, before the condition's
    eval_kind: str  # "niah" (points are context lengths) or "mqar" (points are key-value pairs per document)
    eval: dict  # the set fields of NiahOptions (`lucid eval niah`) or of MqarOptions (`lucid eval mqar`)
    init_from_task: str | None = None  # a run starts from the final weights of this task's run (same condition, seed)

    @property
    def points_key(self) -> str:
        return "pairs" if self.eval_kind == "mqar" else "lengths"

    def out(self, out: Path) -> Path:
        return out / self.name if self.name else out

    def result_file(self, run_dir: Path) -> Path:
        return run_dir / f"{self.eval_kind}.json"

    def eval_arguments(self, run_dir: Path) -> list[str]:
        """``lucid eval niah`` (or ``mqar``) of the run's latest checkpoint, into RUN_DIR/niah.json (mqar.json)."""
        options = MqarOptions(**self.eval) if self.eval_kind == "mqar" else NiahOptions(**self.eval)
        return niah_command(options, checkpoints=[run_dir / "checkpoints"], out=self.result_file(run_dir))


@dataclasses.dataclass
class Experiment:
    base: Path  # the shared training config
    seeds: list[int]
    conditions: dict[str, list[str]]  # name -> "section.key=value" overrides of the base
    tasks: dict[str, Task]  # every condition x seed runs on every task
    plots: dict[str, list[str]]  # plot name -> conditions drawn on it (one figure per task and plot)
    nproc_per_node: int = 1  # processes per training run (GPUs on a node; 1 on a CPU machine)

    def overrides(self, task: Task, condition: str, seed: int, extra: list[str]) -> list[str]:
        return [*task.overrides, *self.conditions[condition], f"train.seed={seed}", *extra]

    def train_arguments(self, task: Task, condition: str, seed: int, out: Path, extra: list[str]) -> list[str]:
        """``lucid train`` of one task, condition and seed, resuming whatever the run dir already holds; a task
        with ``init_from_task`` starts from that task's final checkpoint of the same condition and seed."""
        start = []
        if task.init_from_task is not None:
            source = self.run_dir(out, self.tasks[task.init_from_task], condition, seed) / "checkpoints"
            start = [f"checkpoint.init_from={source.resolve()}"]
        return train_command(self.base, self.run_dir(out, task, condition, seed), nproc_per_node=self.nproc_per_node,
                             resume="auto", overrides=[*self.overrides(task, condition, seed, extra), *start])

    def run_dir(self, out: Path, task: Task, condition: str, seed: int) -> Path:
        return task.out(out) / "runs" / condition / f"seed{seed}"


@dataclasses.dataclass
class TaskFile:
    """One entry of an experiment file's ``tasks:``."""

    title: str
    overrides: Optional[dict[str, Any]] = None  # {section.key: value} of the base, for every condition
    eval: Optional[NiahOptions] = None  # lucid eval niah options ...
    eval_mqar: Optional[MqarOptions] = None  # ... or lucid eval mqar options: exactly one of the two
    init_from_task: Optional[str] = None  # an earlier task: start from its final weights (same condition and seed)

    def validate(self) -> None:
        _check_one_eval(self.eval, self.eval_mqar)


def _check_one_eval(niah, mqar) -> None:
    if (niah is None) == (mqar is None):
        raise ValueError("give exactly one of eval (lucid eval niah options) and eval_mqar (lucid eval mqar options)")


@dataclasses.dataclass
class ExperimentFile:
    """The schema of an experiment file (validated by ``config.schema.from_dict`` like every config).

    One task: ``title`` and ``eval`` (or ``eval_mqar``) at the top.  Several: ``tasks:``, each with its title,
    its overrides of the base and its evaluation; every condition then runs on every task."""

    base: str  # the shared training config, relative to the experiment file
    seeds: list[int]
    conditions: dict[str, Optional[dict[str, Any]]]  # name -> {section.key: value} overrides of the base
    eval: Optional[NiahOptions] = None
    eval_mqar: Optional[MqarOptions] = None
    tasks: Optional[dict[str, TaskFile]] = None
    plots: Optional[dict[str, list[str]]] = None  # plot name -> conditions drawn on it (default: all in one)
    nproc_per_node: int = 1
    title: str = "needle retrieval"

    def validate(self) -> None:
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds={self.seeds!r} must be a non-empty list of integers >= 0")
        if not self.conditions:
            raise ValueError("conditions must be a non-empty mapping of name -> overrides")
        if self.tasks is None:
            _check_one_eval(self.eval, self.eval_mqar)
        elif not self.tasks or self.eval is not None or self.eval_mqar is not None:
            raise ValueError("tasks: give a non-empty mapping of task name -> {title, overrides, eval or eval_mqar}, "
                             "and no top-level eval / eval_mqar beside it")
        else:
            names = list(self.tasks)
            for i, (name, task) in enumerate(self.tasks.items()):
                if task.init_from_task is not None and task.init_from_task not in names[:i]:
                    raise ValueError(f"tasks.{name}.init_from_task={task.init_from_task!r} must name a task listed "
                                     f"before it; earlier tasks: {names[:i]}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node={self.nproc_per_node!r} must be an integer >= 1")
        for name, members in (self.plots or {}).items():
            missing = [m for m in members if m not in self.conditions]
            if missing:
                raise ValueError(f"plots.{name} names unknown conditions {missing}; known: {sorted(self.conditions)}")


def _overrides(mapping: dict | None) -> list[str]:
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in (mapping or {}).items()]


def _task(name: str, title: str, overrides: dict | None, niah, mqar, init_from_task: str | None = None) -> Task:
    options = mqar or niah
    return Task(name=name, title=title, overrides=_overrides(overrides), eval_kind="mqar" if mqar else "niah",
                eval={k: v for k, v in dataclasses.asdict(options).items() if v is not None},
                init_from_task=init_from_task)


def load_experiment(path: str | Path) -> Experiment:
    path = Path(path)
    spec = load_spec_file(path, ExperimentFile, "experiment file")
    base = (path.parent / spec.base).resolve()
    if not base.exists():
        raise FileNotFoundError(f"{path}: base config {str(base)!r} does not exist")
    conditions = {name: _overrides(sets) for name, sets in spec.conditions.items()}
    if spec.tasks is None:
        tasks = {"": _task("", spec.title, None, spec.eval, spec.eval_mqar)}
    else:
        tasks = {name: _task(name, t.title, t.overrides, t.eval, t.eval_mqar, t.init_from_task)
                 for name, t in spec.tasks.items()}
    return Experiment(base=base, seeds=list(spec.seeds), conditions=conditions, tasks=tasks,
                      plots=spec.plots or {"all": list(conditions)}, nproc_per_node=spec.nproc_per_node)


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


def learning_curve(metrics_file: Path) -> dict[int, float]:
    """step -> validation loss of a run's metrics.jsonl (a step logged again after a resume: the last value)."""
    curve = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line) if line else {}
        if "valid_loss" in record:
            curve[int(record["step"])] = record["valid_loss"]
    return dict(sorted(curve.items()))


def _run_one(exp: Experiment, task: Task, condition: str, seed: int, out: Path, extra: list[str],
             threads: int, after=None) -> dict:
    """Train and evaluate one (task, condition, seed) unless already done; returns its evaluation results.
    ``after``: the future of the run this one starts from (waited for first)."""
    if after is not None:
        after.result()  # raises if that run failed: this one cannot start
    run_dir = exp.run_dir(out, task, condition, seed)
    result_file = task.result_file(run_dir)
    label = f"{task.name + ' ' if task.name else ''}{condition} seed {seed}"
    if not result_file.exists():
        commands = [exp.train_arguments(task, condition, seed, out, extra), task.eval_arguments(run_dir)]
        run_logged(run_dir, commands, threads=threads, label=label)
        print(f"experiment: {label} done", flush=True)
    results = json.loads(result_file.read_text())
    by_point = next(iter(results["models"].values()))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [r["loss"] for r in records if "loss" in r]
    curve = learning_curve(run_dir / "metrics.jsonl")
    # answer_loss is absent from results written before it was measured
    run = {"exact_match": {int(n): r["exact_match"] for n, r in by_point.items()},
           "answer_loss": {int(n): r.get("answer_loss") for n, r in by_point.items()},
           "final_train_loss": losses[-1] if losses else None,
           "final_valid_loss": list(curve.values())[-1] if curve else None, "curve": curve}
    if any("by_updates" in r for r in by_point.values()):
        run["by_updates"] = {int(n): {int(u): c for u, c in r["by_updates"].items()} for n, r in by_point.items()}
    return run


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


METRICS = {"exact_match": ("exact match", "%"), "answer_loss": ("answer loss", "nats")}


def _stats(per_seed: list[float]) -> dict:
    mean, std = _mean_std(per_seed)
    return {"mean": mean, "std": std, "per_seed": per_seed}


def aggregate(per_run: dict[str, dict[int, dict]], points: list[int]) -> dict:
    """condition -> {metric: {point: {mean, std, per_seed}}} for exact match and answer loss (a metric the
    runs did not record is left out), the validation loss by step (``curve``, the steps every seed logged),
    ``by_updates`` {point: {times assigned: {metric: stats}}} when the evaluation counts it, and the mean
    final validation loss."""
    summary = {}
    for condition, by_seed in per_run.items():
        runs = [by_seed[s] for s in sorted(by_seed)]
        entry = {}
        for metric in METRICS:
            if any(r.get(metric, {}).get(n) is None for r in runs for n in points):
                continue
            entry[metric] = {n: _stats([r[metric][n] for r in runs]) for n in points}
        steps = sorted(set.intersection(*(set(r.get("curve", {})) for r in runs)))
        entry["curve"] = {step: _stats([r["curve"][step] for r in runs]) for step in steps}
        if all("by_updates" in r for r in runs):
            entry["by_updates"] = {
                n: {u: {metric: _stats([r["by_updates"][n][u][metric] for r in runs]) for metric in METRICS}
                    for u in sorted(set.intersection(*(set(r["by_updates"][n]) for r in runs)))}
                for n in points}
        valid = [r["final_valid_loss"] for r in runs if r["final_valid_loss"] is not None]
        summary[condition] = {**entry, "valid_loss": _mean_std(valid)[0] if valid else None, "seeds": sorted(by_seed)}
    return summary


def _cell(stats: dict, unit: str) -> str:
    scale, digits = (100, 1) if unit == "%" else (1, 3)
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def markdown_table(summary: dict, points: list[int], train_range: tuple[int, int], axis: str = "length") -> str:
    """One table per metric: mean ± sample std over seeds per condition and evaluation point (a length or a
    number of pairs), then, for key update, one per metric by times the queried key was assigned."""
    lo, hi = train_range
    head = ["condition", *[f"{n}{'*' if lo <= n <= hi else ''}" for n in points], "valid loss"]
    seeds = next(iter(summary.values()))["seeds"]
    parts = []
    for metric, (name, unit) in METRICS.items():
        rows = {c: s[metric] for c, s in summary.items() if metric in s}
        if not rows:
            continue
        lines = [f"**{name}** ({unit}) by {axis}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for condition, row in rows.items():
            loss = summary[condition]["valid_loss"]
            lines.append("| " + " | ".join([condition, *[_cell(row[n], unit) for n in points],
                                            f"{loss:.3f}" if loss is not None else "-"]) + " |")
        parts.append("\n".join(lines))
    # (plain MQAR asks keys assigned once only: no breakdown to show)
    updated = {c: s["by_updates"] for c, s in summary.items()
               if len(next(iter(s.get("by_updates", {}).values()), {})) > 1}
    if updated:
        columns = [(n, u) for n in points for u in next(iter(updated.values()))[n]]
        for metric, (name, unit) in METRICS.items():
            lines = [f"**{name}** ({unit}) by {axis} / times the queried key was assigned\n",
                     "| " + " | ".join(["condition", *[f"{n} / {u}x" for n, u in columns]]) + " |",
                     "|" + "---|" * (len(columns) + 1)]
            for condition, by_updates in updated.items():
                lines.append("| " + " | ".join([condition, *[_cell(by_updates[n][u][metric], unit)
                                                              for n, u in columns]]) + " |")
            parts.append("\n".join(lines))
    parts.append(f"Mean ± sample std over seeds {seeds}; * = inside the training range [{lo}, {hi}] ({axis}).")
    return "\n\n".join(parts) + "\n"


def _style(condition: str) -> dict:
    return {"linestyle": "--" if "softmax" in condition else "-", "marker": "o", "capsize": 3}


def plot_group(summary: dict, members: list[str], points: list[int], path: Path, title: str,
               axis: str = "context length (tokens)", breakdown: int | None = None) -> None:
    """One figure: exact match and answer loss vs the evaluation points, the validation answer loss by step,
    and (key update) exact match by times the queried key was assigned at the ``breakdown`` point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_updates = breakdown is not None and all(len(summary[c].get("by_updates", {}).get(breakdown, {})) > 1
                                               for c in members)
    panels = [m for m in METRICS if all(m in summary[c] for c in members)] + ["curve"] + (["updates"] * by_updates)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for condition in members:
            entry = summary[condition]
            if panel in METRICS:
                row = entry[panel]
                ax.errorbar(points, [row[n]["mean"] for n in points], yerr=[row[n]["std"] for n in points],
                            label=condition, **_style(condition))
            elif panel == "curve":
                # one line per seed: a seed that learns late would pull a mean curve up for everyone
                steps = list(entry["curve"])
                color = None
                for k in range(len(entry["seeds"])):
                    line, = ax.plot(steps, [entry["curve"][s]["per_seed"][k] for s in steps], color=color,
                                    label=condition if k == 0 else None, linewidth=1, alpha=0.8,
                                    linestyle=_style(condition)["linestyle"], marker="o" if len(steps) < 4 else None)
                    color = line.get_color()
            else:
                row = entry["by_updates"][breakdown]
                times = list(row)
                ax.errorbar(times, [row[u]["exact_match"]["mean"] for u in times],
                            yerr=[row[u]["exact_match"]["std"] for u in times], label=condition, **_style(condition))
        if panel in METRICS:
            name, unit = METRICS[panel]
            ax.set_xscale("log", base=2)
            ax.set_xticks(points, [str(n) for n in points])
            ax.set_xlabel(axis)
            ax.set_ylabel(f"{name}" + (" (nats)" if unit == "nats" else ""))
            if panel == "exact_match":
                ax.set_ylim(-0.02, 1.02)
        elif panel == "curve":
            ax.set_xlabel("training step")
            ax.set_ylabel("validation answer loss (nats)")
            losses = [v for c in members for s in summary[c]["curve"].values() for v in s["per_seed"]]
            if losses and min(losses) > 0:
                ax.set_yscale("log")  # a learned task goes from nats to 1e-5: only a log scale shows both
        else:
            ax.set_xlabel(f"times the queried key was assigned ({breakdown} pairs)")
            ax.set_xticks(list(summary[members[0]]["by_updates"][breakdown]))
            ax.set_ylabel("exact match")
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{title} (mean ± std over seeds; learning curves: one line per seed)")
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=110)
    plt.close(fig)


def _jsonable(summary: dict) -> dict:
    """JSON keys are strings: the points, steps and update counts become their decimal text."""
    def keys_to_text(value):
        if isinstance(value, dict):
            return {str(k): keys_to_text(v) for k, v in value.items()}
        return value
    return keys_to_text(summary)


def run_experiment(exp: Experiment, out: Path, *, jobs: int = 2, only: list[str] | None = None,
                   seeds: list[int] | None = None, extra: list[str] | None = None,
                   eval_overrides: dict | None = None) -> dict:
    """Run (or finish) every task x selected condition x seed, then write each task's results.json, table.md
    and plots (in --out, or --out/TASK for an experiment with ``tasks:``); returns {task: summary}."""
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
    tasks = [dataclasses.replace(t, eval={**t.eval, **(eval_overrides or {})}) for t in exp.tasks.values()]
    out.mkdir(parents=True, exist_ok=True)

    # Runs of a task read the same dataset: write each task's once here, before runs start in parallel.
    configs = {t.name: load_train_config(exp.base, exp.overrides(t, conditions[0], seeds[0], extra)) for t in tasks}
    for cfg in configs.values():
        ensure_synth_dataset(cfg.data, say=lambda text: print(f"experiment: {text}", flush=True), strict=True)
    threads = max(1, (os.cpu_count() or 1) // (jobs * exp.nproc_per_node))
    # Tasks in file order, so a run's init_from_task run was submitted (and, the pool being first in first out,
    # started) before it: waiting for it cannot take a worker that run needs.
    work = [(t, c, s) for t in tasks for c in conditions for s in seeds]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {}
        for t, c, s in work:
            after = futures[(t.init_from_task, c, s)] if t.init_from_task is not None else None
            futures[(t.name, c, s)] = pool.submit(_run_one, exp, t, c, s, out, extra, threads, after)
        per_run: dict[str, dict[str, dict[int, dict]]] = {}
        for (task, condition, seed), future in futures.items():
            per_run.setdefault(task, {}).setdefault(condition, {})[seed] = future.result()
    return {t.name: _report_task(exp, t, configs[t.name], per_run[t.name], out, seeds, extra) for t in tasks}


def _report_task(exp: Experiment, task: Task, cfg, per_run: dict, out: Path, seeds: list[int],
                 extra: list[str]) -> dict:
    """Aggregate one task's runs into results.json (summary and per-seed values), table.md and its plots."""
    points = sorted(int(n) for n in task.eval[task.points_key])
    summary = aggregate(per_run, points)
    synth = cfg.data.synth
    if task.eval_kind == "mqar":
        mqar = synth.mqar if synth and synth.mqar else None
        train_range = (mqar.min_pairs, mqar.max_pairs) if mqar else (0, 0)
        axis, axis_label = "pairs", "key-value pairs per document"
    else:
        retrieval = synth.task if synth else None
        train_range = ((retrieval.min_len, retrieval.max_len) if retrieval
                       else (cfg.train.seq_length, cfg.train.seq_length))
        axis, axis_label = "length", "context length (tokens)"
    task_out = task.out(out)
    task_out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(task_out / "results.json", json.dumps(
        {"experiment": {"base": str(exp.base), "task": task.name, "title": task.title, "seeds": seeds,
                        "task_overrides": task.overrides, "conditions": {c: exp.conditions[c] for c in per_run},
                        "eval_kind": task.eval_kind, "eval": task.eval, "extra_overrides": extra,
                        "train_range": train_range},
         "summary": _jsonable(summary), "per_seed": _jsonable(per_run)}, indent=1))
    table = markdown_table(summary, points, train_range, axis)
    atomic.write_text(task_out / "table.md", table)
    # the breakdown is drawn at the first point beyond training (inside it every learned model is near 100%)
    breakdown = next((n for n in points if n > train_range[1]), points[-1]) if task.eval_kind == "mqar" else None
    for name, members in exp.plots.items():
        drawn = [m for m in members if m in summary]
        if drawn:
            plot_group(summary, drawn, points, task_out / f"{name}.png", f"{task.title}: {name}", axis_label,
                       breakdown)
    print(f"{task.title}\n\n{table}", flush=True)
    return summary
