"""The context-extension recipe, measured: train a model short, continue it at a longer length once per RoPE
variant, and score every model with ``lucid eval niah`` (exact match by length) and ``lucid eval ppl`` (answer
loss by position bucket).

A recipe file (configs/context-extension/recipe.yaml) names the two training configs, the seeds, the attentions
and the variants as ``--set`` overrides, so every run is one plain ``lucid train`` command (kept in the run's
``command.txt``).  Resumable like ``lucid experiment repro``: a scored run is not redone, an interrupted one
continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lucid_megatron import atomic
from lucid_megatron.config.schema import ConfigError, load_spec_file
from lucid_megatron.runtime.commands import NiahOptions, niah_command, train_command

from .repro import _mean_std, run_logged

SHORT = "short"  # the stage name of the model before extension, beside the variants


@dataclasses.dataclass
class ExtensionEval:
    niah_lengths: list[int]
    niah_samples: int = 50  # documents per length
    ppl_docs: list[int] = dataclasses.field(default_factory=lambda: [128, 1024])  # [min, max] document length
    ppl_rows: int = 32
    bucket: int = 128

    def validate(self) -> None:
        if not self.niah_lengths or min(self.niah_lengths) < 1:
            raise ConfigError(f"niah_lengths: must be a non-empty list of lengths >= 1, got {self.niah_lengths}")
        if len(self.ppl_docs) != 2 or not 0 < self.ppl_docs[0] <= self.ppl_docs[1]:
            raise ConfigError(f"ppl_docs: must be [min, max] document lengths, 0 < min <= max, got {self.ppl_docs}")
        for name in ("niah_samples", "ppl_rows", "bucket"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class RecipeFile:
    """The schema of a recipe file (validated by ``config.schema.from_dict`` like every config)."""

    short: str  # training config of the short stage, relative to the recipe file
    extend: str  # training config of the continuation (checkpoint.init_from is set to the short run)
    seeds: list[int]
    attention: dict[str, list[str]]  # name -> overrides of both stages
    variants: dict[str, list[str]]  # name -> overrides of the continuation
    eval: ExtensionEval

    def validate(self) -> None:
        if not self.seeds or min(self.seeds) < 0:
            raise ConfigError(f"seeds: must be a non-empty list of integers >= 0, got {self.seeds}")
        for name in ("attention", "variants"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must name at least one (name: [overrides])")
        if SHORT in self.variants:
            raise ConfigError(f"variants: {SHORT!r} names the model before extension; call the variant otherwise")


@dataclasses.dataclass
class Recipe:
    short: Path
    extend: Path
    seeds: list[int]
    attention: dict[str, list[str]]
    variants: dict[str, list[str]]
    eval: ExtensionEval

    def overrides(self, attention: str, stage: str, seed: int) -> list[str]:
        variant = [] if stage == SHORT else self.variants[stage]
        return [*self.attention[attention], *variant, f"train.seed={seed}"]

    def config(self, attention: str, stage: str, seed: int, extra: list[str] = ()):
        from lucid_megatron.config.train import load_train_config

        path = self.short if stage == SHORT else self.extend
        return load_train_config(path, [*self.overrides(attention, stage, seed), *extra])


def load_recipe(path: str | Path) -> Recipe:
    """The recipe with every (attention, stage) training config loaded and checked: they load, the continuation
    is longer than the short stage, and both stages build a model of the same shapes (init_from needs it)."""
    from lucid_megatron.train.validate import SHAPE_FIELDS

    path = Path(path)
    spec = load_spec_file(path, RecipeFile, "recipe file")
    recipe = Recipe(short=(path.parent / spec.short).resolve(), extend=(path.parent / spec.extend).resolve(),
                    seeds=list(spec.seeds), attention=spec.attention, variants=spec.variants, eval=spec.eval)
    for name in ("short", "extend"):
        if not getattr(recipe, name).exists():
            raise FileNotFoundError(f"{path}: {name} config {str(getattr(recipe, name))!r} does not exist")
    for attention in recipe.attention:
        short = _checked(path, recipe, attention, SHORT)
        for variant in recipe.variants:
            extend = _checked(path, recipe, attention, variant)
            if extend.train.seq_length <= short.train.seq_length:
                raise ConfigError(f"{path}: {attention}/{variant}: train.seq_length {extend.train.seq_length} is not "
                                  f"longer than the short stage's {short.train.seq_length}")
            differ = [n for n in SHAPE_FIELDS if getattr(extend.model, n) != getattr(short.model, n)]
            if differ:
                raise ConfigError(f"{path}: {attention}/{variant}: model.{differ[0]} differs from the short stage's "
                                  f"({getattr(extend.model, differ[0])!r} vs {getattr(short.model, differ[0])!r}); "
                                  "the continuation starts from its weights")
    return recipe


def _checked(path: Path, recipe: Recipe, attention: str, stage: str):
    try:
        return recipe.config(attention, stage, recipe.seeds[0])
    except ConfigError as err:
        raise ConfigError(f"{path}: {attention}/{stage}: {err}") from None


# ---- running -------------------------------------------------------------------------------------------------


def _datasets(recipe: Recipe, out: Path, extra: list[str]) -> dict[str, Path]:
    """Write the two training datasets and the ppl one under OUT/data (once, before any run starts, so parallel
    runs never race to write them); returns stage kind -> path."""
    from lucid_megatron.data.synth import RetrievalTask, ensure_synth_dataset, write_synth_dataset
    from lucid_megatron.data.tokenizer import ByteTokenizer

    attention = next(iter(recipe.attention))
    paths = {"short": out / "data" / "short", "extend": out / "data" / "extend", "ppl": out / "data" / "ppl"}
    for kind, stage in (("short", SHORT), ("extend", next(iter(recipe.variants)))):
        cfg = recipe.config(attention, stage, recipe.seeds[0], [*extra, f"data.path={paths[kind]}"])
        ensure_synth_dataset(cfg.data)
    if not (paths["ppl"] / "manifest.json").exists():
        task = dataclasses.replace(cfg.data.synth.task, min_len=recipe.eval.ppl_docs[0],
                                   max_len=recipe.eval.ppl_docs[1])
        write_synth_dataset(paths["ppl"], task, train_docs=1, valid_docs=4 * recipe.eval.ppl_rows,
                            docs_per_shard=4 * recipe.eval.ppl_rows, seed=7, tokenizer=ByteTokenizer())
    return paths


def _commands(recipe: Recipe, attention: str, stage: str, seed: int, run_dir: Path, data: dict[str, Path],
              extra: list[str], eval_samples: int | None) -> list[list[str]]:
    config = recipe.short if stage == SHORT else recipe.extend
    overrides = [*recipe.overrides(attention, stage, seed), *extra,
                 f"data.path={data['short' if stage == SHORT else 'extend']}"]
    if stage != SHORT:
        overrides.append(f"checkpoint.init_from={run_dir.parent / SHORT / 'checkpoints'}")
    task = recipe.config(attention, SHORT, seed, extra).data.synth.task
    niah = NiahOptions(lengths=recipe.eval.niah_lengths, needles=task.num_needles, queries=task.num_queries,
                       key_len=task.key_len, value_len=task.value_len, filler_words=task.filler_words,
                       num_samples=eval_samples or recipe.eval.niah_samples, seed=2026)
    ppl = ["eval", "ppl", "--checkpoint", str(run_dir / "checkpoints"), "--data", str(data["ppl"]),
           "--seq-length", str(recipe.eval.ppl_docs[1]), "--rows", str(recipe.eval.ppl_rows),
           "--bucket-size", str(recipe.eval.bucket), "--loss-tokens", "answer", "--out", str(run_dir / "ppl.json")]
    return [train_command(config, run_dir, overrides=overrides, resume="auto"),
            niah_command(niah, checkpoints=[run_dir / "checkpoints"], out=run_dir / "niah.json"), ppl]


def _run_chain(recipe: Recipe, attention: str, seed: int, out: Path, data, extra, eval_samples, threads) -> None:
    """The short stage of one (attention, seed), then each variant's continuation; each scored once.  A step
    whose product exists is skipped (training's is the niah.json scored after it), so a rerun redoes only
    what is missing, e.g. the ppl scoring after its settings changed."""
    for stage in (SHORT, *recipe.variants):
        run_dir = out / "runs" / attention / f"seed{seed}" / stage
        commands = _commands(recipe, attention, stage, seed, run_dir, data, extra, eval_samples)
        run_logged(run_dir, commands, threads=threads, label=f"{attention} seed {seed} {stage}",
                   products=[run_dir / "niah.json", run_dir / "niah.json", run_dir / "ppl.json"])
        print(f"context extension: {attention} seed {seed} {stage} done", flush=True)


def run_recipe(recipe: Recipe, out: Path, *, jobs: int = 2, seeds=None, extra: list[str] = (),
               eval_samples: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra)
    data = _datasets(recipe, out, extra)
    seeds = list(seeds or recipe.seeds)
    chains = [(attention, seed) for seed in seeds for attention in recipe.attention]
    threads = max(1, (os.cpu_count() or 1) // min(jobs, len(chains)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(_run_chain, recipe, a, s, out, data, extra, eval_samples, threads)
                       for a, s in chains]:
            future.result()
    summary = summarize(recipe, out, seeds)
    atomic.write_text(out / "results.json", json.dumps(summary, indent=1))
    atomic.write_text(out / "table.md", markdown_table(summary, recipe))
    return summary


# ---- results ---------------------------------------------------------------------------------------------------


def summarize(recipe: Recipe, out: Path, seeds: list[int]) -> dict:
    """attention -> stage -> {exact_match / answer_loss_by_length: {length: mean/std/per_seed},
    answer_loss_by_position: {bucket: ...}} (niah's exact match and answer loss; ppl's answer loss by bucket)."""
    summary = {}
    for attention in recipe.attention:
        for stage in (SHORT, *recipe.variants):
            runs = [out / "runs" / attention / f"seed{seed}" / stage for seed in seeds]
            niah = [next(iter(json.loads((r / "niah.json").read_text())["models"].values())) for r in runs]
            ppl = [json.loads((r / "ppl.json").read_text())["by_position"] for r in runs]
            exact = {n: _stat([x[str(n)]["exact_match"] for x in niah]) for n in recipe.eval.niah_lengths}
            answer = {n: _stat([x[str(n)]["answer_loss"] for x in niah]) for n in recipe.eval.niah_lengths}
            buckets = [b for b in ppl[0] if all(b in p for p in ppl)]
            loss = {b: _stat([p[b]["loss"] for p in ppl]) for b in buckets}
            summary.setdefault(attention, {})[stage] = {"exact_match": exact, "answer_loss_by_length": answer,
                                                        "answer_loss_by_position": loss, "seeds": seeds}
    return summary


def _stat(values: list[float]) -> dict:
    mean, std = _mean_std(values)
    return {"mean": mean, "std": std, "per_seed": values}


def markdown_table(summary: dict, recipe: Recipe) -> str:
    """Per attention and stage: niah's answer loss and exact match by length, then ppl's answer loss by bucket."""
    lengths = recipe.eval.niah_lengths
    first = next(iter(next(iter(summary.values())).values()))
    buckets = list(first["answer_loss_by_position"])
    head = ["attention", "RoPE", *[f"loss @{n}" for n in lengths], *[f"EM @{n}" for n in lengths],
            *[f"loss pos {b}" for b in buckets]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(stat, scale=1, digits=2):
        return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"

    for attention, stages in summary.items():
        for stage, row in stages.items():
            cells = [cell(row["answer_loss_by_length"][n]) for n in lengths]
            cells += [cell(row["exact_match"][n], 100, 0) for n in lengths]
            cells += [cell(row["answer_loss_by_position"][b]) if b in row["answer_loss_by_position"] else "-"
                      for b in buckets]
            lines.append("| " + " | ".join([attention, "before extension" if stage == SHORT else stage, *cells]) + " |")
    lines.append("")
    lines.append(f"Mean ± sample std over seeds {first['seeds']}. loss @N / EM @N: `lucid eval niah` at N tokens, "
                 "answer loss (nats per answer token) and exact match (%); loss pos: `lucid eval ppl --loss-tokens "
                 "answer` on documents of "
                 f"{recipe.eval.ppl_docs[0]}-{recipe.eval.ppl_docs[1]} tokens, by position bucket.")
    return "\n".join(lines) + "\n"
