"""`lucid experiment repro` (a seconds-long smoke of the real experiment file) and the attention-sink toy."""

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lucid_megatron.experiment import toy
from lucid_megatron.experiment.repro import aggregate, load_experiment, markdown_table
from lucid_megatron.runtime.commands import override_arguments, process_command
from tests.train.runs import train_env

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "configs" / "repro" / "experiment.yaml"
SMOKE = ["train.steps=2", "data.synth.train_docs=64", "data.synth.valid_docs=8", "data.synth.docs_per_shard=16",
         "data.eval_rows=2", "checkpoint.interval=0"]


def _repro(out: Path, data: Path) -> subprocess.CompletedProcess:
    command = process_command(["experiment", "repro", str(EXPERIMENT), "--out", str(out), "--only", "softmax", "lucid",
                               "--seeds", "0", "--eval-samples", "2", "--jobs", "2",
                               *override_arguments([*SMOKE, f"data.path={data}"])])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=train_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_repro_smoke_writes_table_and_plots_and_resumes(tmp_path):
    out = tmp_path / "repro"
    first = _repro(out, tmp_path / "data")
    assert "softmax seed 0 done" in first.stdout and "lucid seed 0 done" in first.stdout
    results = json.loads((out / "results.json").read_text())
    exp = load_experiment(EXPERIMENT)
    lengths = [str(n) for n in exp.tasks[""].eval["lengths"]]
    for condition in ("softmax", "lucid"):
        niah = next(iter(json.loads((out / "runs" / condition / "seed0" / "niah.json").read_text())["models"].values()))
        for metric in ("exact_match", "answer_loss"):
            row = results["summary"][condition][metric]
            assert list(row) == lengths
            for n in lengths:
                per_seed = row[n]["per_seed"]
                assert len(per_seed) == 1 and row[n]["std"] == 0.0 and niah[n][metric] == row[n]["mean"]
                assert 0.0 <= per_seed[0] <= (1.0 if metric == "exact_match" else 20.0)
    # the softmax condition really is the baseline: its command switches LUCID off, LUCID's does not
    assert "model.lucid_layers=none" in (out / "runs" / "softmax" / "seed0" / "command.txt").read_text()
    assert "lucid_layers" not in (out / "runs" / "lucid" / "seed0" / "command.txt").read_text()
    table = (out / "table.md").read_text()
    assert table.count("\n| softmax |") == 2 and table.count("\n| lucid |") == 2  # exact match, answer loss
    for plot in exp.plots:
        assert (out / f"{plot}.png").stat().st_size > 1000
    # a second call finds every run finished and rebuilds the same results without training
    second = _repro(out, tmp_path / "data")
    assert "seed 0 done" not in second.stdout
    assert json.loads((out / "results.json").read_text()) == results


MQAR_EXPERIMENT = REPO / "configs" / "repro" / "mqar" / "experiment.yaml"


def test_mqar_experiment_smoke_runs_both_tasks_on_their_own_data(tmp_path):
    """The shipped MQAR experiment file end to end in seconds: both tasks, one condition (the softmax baseline
    runs in the smoke above), one seed, 2 steps; each task writes its own dataset (relative data paths land in
    the working directory) and its outputs, and key update starts from the MQAR run's weights."""
    smoke = ["train.steps=2", "data.synth.train_docs=64", "data.synth.valid_docs=8", "data.synth.docs_per_shard=16",
             "data.eval_rows=2", "checkpoint.interval=0"]
    command = process_command(["experiment", "repro", str(MQAR_EXPERIMENT), "--out", "out", "--only", "lucid",
                               "--seeds", "0", "--eval-samples", "2", "--jobs", "2", *override_arguments(smoke)])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=train_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    exp = load_experiment(MQAR_EXPERIMENT)
    from lucid_megatron.data.shards import read_manifest

    for name, task in exp.tasks.items():
        manifest = read_manifest(tmp_path / dict(o.split("=", 1) for o in task.overrides)["data.path"])
        assert manifest.source["kind"] == "mqar" and manifest.source["task"]["updates"] == task.eval["updates"]
        results = json.loads((tmp_path / "out" / name / "results.json").read_text())
        pairs = [str(n) for n in task.eval["pairs"]]
        for condition in ("lucid",):
            run = tmp_path / "out" / name / "runs" / condition / "seed0"
            scored = next(iter(json.loads((run / "mqar.json").read_text())["models"].values()))
            summary, per_seed = results["summary"][condition], results["per_seed"][condition]["0"]
            for metric in ("exact_match", "answer_loss"):
                assert list(summary[metric]) == pairs
                assert all(summary[metric][n]["mean"] == scored[n][metric] == per_seed[metric][n] for n in pairs)
            # the learning curve is the validation loss the run logged, step by step
            curve = {json.loads(line)["step"]: json.loads(line)["valid_loss"]
                     for line in (run / "metrics.jsonl").read_text().splitlines() if "valid_loss" in line}
            assert per_seed["curve"] == {str(k): v for k, v in curve.items()} and curve
            assert {k: v["mean"] for k, v in summary["curve"].items()} == per_seed["curve"]
            updates = summary["by_updates"][pairs[0]]
            assert sorted(updates) == [str(u) for u in range(1, task.eval["updates"] + 1)]
            assert updates["1"]["exact_match"]["mean"] == scored[pairs[0]]["by_updates"]["1"]["exact_match"]
            if task.init_from_task:
                source = tmp_path / "out" / task.init_from_task / "runs" / condition / "seed0" / "checkpoints"
                assert f"checkpoint.init_from={source.resolve()}" in (run / "command.txt").read_text()
                assert f"initialising weights from {source.resolve()}" in (run / "log.txt").read_text()
        table = (tmp_path / "out" / name / "table.md").read_text()
        assert "| 8* | 16 | 32 |" in table and ("/ 3x" in table) == (task.eval["updates"] == 3)
        for plot in exp.plots:
            assert (tmp_path / "out" / name / f"{plot}.png").stat().st_size > 1000


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = {"a": {0: {"exact_match": {8: 0.25}, "answer_loss": {8: 0.5}, "final_valid_loss": 1.0},
                  1: {"exact_match": {8: 0.5}, "answer_loss": {8: 1.5}, "final_valid_loss": 2.0},
                  2: {"exact_match": {8: 1.0}, "answer_loss": {8: 2.5}, "final_valid_loss": 3.0}},
            # a run stored before the answer loss was measured: that condition reports exact match only
            "old": {0: {"exact_match": {8: 0.5}, "answer_loss": {8: None}, "final_valid_loss": None}}}
    summary = aggregate(runs, [8])
    for metric, values in (("exact_match", [0.25, 0.5, 1.0]), ("answer_loss", [0.5, 1.5, 2.5])):
        values = np.array(values, dtype=np.float64)
        assert summary["a"][metric][8]["mean"] == pytest.approx(values.mean(), abs=1e-15)
        assert summary["a"][metric][8]["std"] == pytest.approx(values.std(ddof=1), abs=1e-15)
    assert "answer_loss" not in summary["old"] and summary["old"]["exact_match"][8]["mean"] == 0.5
    assert summary["a"]["valid_loss"] == pytest.approx(2.0)
    table = markdown_table(summary, [8], (4, 8))
    exact, loss = table.split("**answer loss**")
    assert "| a | 58.3 ± 38.2 | 2.000 |" in exact and "| old | 50.0 ± 0.0 | - |" in exact
    assert "| a | 1.500 ± 1.000 | 2.000 |" in loss and "old" not in loss
    assert "| 8* |" in table.replace(" | valid loss", "")


def test_curves_and_key_update_breakdown_aggregate_over_seeds(tmp_path):
    from lucid_megatron.experiment.repro import learning_curve

    metrics = tmp_path / "metrics.jsonl"
    # a resumed run logs step 100 twice: the curve keeps the later value; training-loss records are skipped
    metrics.write_text('{"step": 50, "loss": 9.0}\n{"step": 50, "valid_loss": 3.0}\n{"step": 100, "valid_loss": 2.0}\n'
                       '{"step": 100, "valid_loss": 1.5}\n\n')
    assert learning_curve(metrics) == {50: 3.0, 100: 1.5}

    def run(curve, first, latest):
        cell = {"exact_match": first, "answer_loss": 1 - first}
        return {"exact_match": {8: first}, "answer_loss": {8: 1 - first}, "final_valid_loss": 0.5, "curve": curve,
                "by_updates": {8: {1: cell, 2: {"exact_match": latest, "answer_loss": 1 - latest}}}}

    runs = {"a": {0: run({50: 3.0, 100: 1.0}, 1.0, 0.5), 1: run({50: 2.0, 100: 0.5, 150: 0.1}, 0.5, 0.25)}}
    summary = aggregate(runs, [8])["a"]
    assert list(summary["curve"]) == [50, 100]  # the steps every seed logged
    assert summary["curve"][50]["mean"] == 2.5 and summary["curve"][100]["per_seed"] == [1.0, 0.5]
    assert summary["curve"][50]["std"] == pytest.approx(np.std([3.0, 2.0], ddof=1), abs=1e-15)
    two = summary["by_updates"][8][2]
    assert two["exact_match"]["mean"] == 0.375 and two["answer_loss"]["per_seed"] == [0.5, 0.75]
    table = markdown_table({"a": summary}, [8], (4, 8), "pairs")
    assert "by pairs / times the queried key was assigned" in table and "| a | 75.0 ± 35.4 | 37.5 ± 17.7 |" in table


@pytest.mark.parametrize("text, message", [
    ("base: base.yaml\nseeds: []\nconditions: {a: {}}\neval: {lengths: [8]}\n", "seeds=[]"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\nplots: {p: [b]}\n", "unknown conditions ['b']"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8], depth: 3}\n", "eval.depth: unknown key"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {needles: 2}\n", "eval: missing required key"),
    ("base: base.yaml\nseeds: [0, x]\nconditions: {a: {}}\neval: {lengths: [8]}\n", "seeds[1]: expected int"),
    ("base: nowhere.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\n", "does not exist"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\n", "give exactly one of eval"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\neval_mqar: {pairs: [8]}\n",
     "give exactly one of eval"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\n"
     "tasks: {t: {title: T, eval_mqar: {pairs: [8]}}}\n", "no top-level eval"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\ntasks: {t: {title: T, eval_mqar: {pairs: [8]}, "
     "init_from_task: u}, u: {title: U, eval_mqar: {pairs: [8]}}}\n", "init_from_task='u' must name a task listed before"),
])
def test_experiment_file_errors_name_the_problem(tmp_path, text, message):
    (tmp_path / "base.yaml").write_text("{}")
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(path)


def test_toy_targets_against_float64():
    tokens = torch.tensor([[3, 0, 1, 2], [2, 3, 1, 0]])
    got = toy.targets(tokens, "cumavg", vocab=4)
    one_hot = np.eye(4, dtype=np.float64)[tokens.numpy()]
    want = np.cumsum(one_hot, axis=1) / np.arange(1, 5, dtype=np.float64)[None, :, None]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7)
    np.testing.assert_array_equal(toy.targets(tokens, "identity", vocab=4).numpy(), one_hot)
    with pytest.raises(ValueError, match="phase='sum'"):
        toy.targets(tokens, "sum", vocab=4)


def test_first_token_attention_of_uniform_attention():
    cfg = toy.ToyConfig()
    model = toy.OneLayerAttention(cfg, "softmax")
    with torch.no_grad():
        model.qkv.weight[: cfg.width] = 0.0  # q = 0: every row attends uniformly to its prefix
    tokens = toy.batch(torch.Generator().manual_seed(0), cfg)
    uniform = np.mean([1.0 / (i + 1) for i in range(1, cfg.vocab)], dtype=np.float64)
    assert toy.first_token_attention(model, tokens) == pytest.approx(uniform, rel=1e-6)
    stats = toy.attention_stats(model, tokens)
    assert stats["max_weight"] == pytest.approx(uniform, rel=1e-6) == stats["self_weight"]
    assert stats["logit_range"] == 0.0


def test_attention_stats_against_float64():
    cfg = toy.ToyConfig(width=16)
    torch.manual_seed(3)
    model = toy.OneLayerAttention(cfg, "lucid")
    with torch.no_grad():
        model.qkv.weight.mul_(8.0)  # sharp enough that the four statistics differ
    tokens = toy.batch(torch.Generator().manual_seed(1), cfg)
    q, k, _ = (t.double() for t in model.qkv(model.embed(tokens)).detach().chunk(3, dim=-1))
    logits = (q @ k.transpose(1, 2)).numpy() / 4.0  # scale 1/sqrt(16)
    first, largest, own, spread = [], [], [], []
    for b in range(tokens.shape[0]):
        for i in range(1, cfg.vocab):
            row = logits[b, i, : i + 1]
            weights = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
            first.append(weights[0]), largest.append(weights.max()), own.append(weights[i])
            spread.append(row.max() - row.min())
    stats = toy.attention_stats(model, tokens)
    for key, values in (("first_token", first), ("max_weight", largest), ("self_weight", own),
                        ("logit_range", spread)):
        assert stats[key] == pytest.approx(np.mean(values), rel=1e-5), key
    assert len({round(v, 3) for v in stats.values()}) == 4


def test_toy_attentions_differ_and_learn_the_identity():
    cfg = toy.ToyConfig(phase_steps=80, batch_size=16)
    tokens = toy.batch(torch.Generator().manual_seed(0), cfg)
    torch.manual_seed(0)
    softmax = toy.OneLayerAttention(cfg, "softmax")
    torch.manual_seed(0)
    lucid = toy.OneLayerAttention(cfg, "lucid")
    # Random keys of width 256 are nearly orthogonal, so LUCID's kernel matrix is nearly the identity at
    # initialisation and both models agree; aligned keys (a rank-1 key projection) make them differ.
    assert (softmax(tokens) - lucid(tokens)).abs().max() < 1e-3
    with torch.no_grad():
        for model in (softmax, lucid):
            w = cfg.width
            model.qkv.weight[w : 2 * w] = torch.outer(torch.ones(w), model.qkv.weight[w]) / w
    assert (softmax(tokens) - lucid(tokens)).abs().max() > 1e-2
    for attention in ("softmax", "lucid"):
        curves, stats = toy.train_toy(cfg, attention, stats_every=40)
        for phase in ("identity", "cumavg"):
            assert [step for step, _ in stats[phase]["trajectory"]] == [0, 40, 80]
            assert stats[phase]["trajectory"][-1][1] == stats[phase]["end"]
            assert 0.0 <= stats[phase]["end"]["first_token"] <= stats[phase]["end"]["max_weight"] <= 1.0
        assert curves["identity"][-1][1] < 0.2 * curves["identity"][0][1], (attention, curves["identity"])
        assert len(curves["cumavg"]) == len(curves["identity"])
        # without a residual the identity is solved by attending to oneself: the attention sharpens
        assert stats["identity"]["end"]["self_weight"] > 2 * stats["identity"]["trajectory"][0][1]["self_weight"]


@pytest.mark.parametrize("path", [EXPERIMENT, REPO / "configs" / "repro" / "gpu-125m" / "experiment.yaml"])
def test_shipped_experiments_are_valid_and_vary_one_thing(path):
    from lucid_megatron.config.train import load_train_config

    exp = load_experiment(path)
    configs = {name: load_train_config(exp.base, overrides) for name, overrides in exp.conditions.items()}
    base = configs["lucid"]
    assert configs["softmax"].model.lucid_layers == "none" and base.model.lucid_layers == "all"
    assert configs["softmax_+10%_steps"].train.steps == round(1.1 * base.train.steps)
    head_dims = {c.model.kv_channels for n, c in configs.items() if n.startswith("lucid")}
    assert head_dims >= {16, 32} and len(head_dims) == 3
    assert {c.model.hidden_size for c in configs.values()} == {base.model.hidden_size}  # equal width
    assert configs["lucid_nope"].model.position_embedding == "none" and base.model.position_embedding == "rope"
    assert len(exp.seeds) >= 3
    task = base.data.synth.task
    assert max(exp.tasks[""].eval["lengths"]) >= 4 * task.max_len and min(exp.tasks[""].eval["lengths"]) <= task.max_len


def test_shipped_key_update_experiment_is_valid_and_varies_one_thing():
    from lucid_megatron.config.train import load_train_config

    exp = load_experiment(REPO / "configs" / "repro" / "key-update" / "experiment.yaml")
    configs = {name: load_train_config(exp.base, overrides) for name, overrides in exp.conditions.items()}
    assert set(configs) == {"softmax", "lucid", "softmax_nope", "lucid_nope"} and len(exp.seeds) >= 3
    for name, cfg in configs.items():
        assert cfg.model.lucid_layers == ("none" if name.startswith("softmax") else "all")
        assert cfg.model.position_embedding == ("none" if name.endswith("nope") else "rope")
        others = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in ("lucid_layers", "position_embedding")}
        assert others == {k: v for k, v in dataclasses.asdict(configs["lucid"].model).items()
                          if k not in ("lucid_layers", "position_embedding")}
    task = configs["lucid"].data.synth.task
    assert task.updates > 1  # a key-update task: the answer is the latest of several values
    # evaluated on the training task at 1x, 2x and 4x the training length
    assert sorted(exp.tasks[""].eval["lengths"]) == [task.max_len, 2 * task.max_len, 4 * task.max_len]
    for field in ("updates", "key_len", "value_len", "filler_words", "template"):
        assert exp.tasks[""].eval[field] == getattr(task, field), field
    assert (exp.tasks[""].eval["needles"], exp.tasks[""].eval["queries"]) == (task.num_needles, task.num_queries)


def test_shipped_mqar_experiment_is_valid_and_varies_one_thing():
    from lucid_megatron.config.train import load_train_config

    exp = load_experiment(MQAR_EXPERIMENT)
    assert list(exp.tasks) == ["mqar", "key_update"] and len(exp.seeds) >= 3
    assert exp.tasks["key_update"].init_from_task == "mqar" and exp.tasks["mqar"].init_from_task is None
    for task in exp.tasks.values():
        configs = {name: load_train_config(exp.base, exp.overrides(task, name, 0, [])) for name in exp.conditions}
        assert set(configs) == {"softmax", "lucid", "softmax_nope", "lucid_nope"}
        for name, cfg in configs.items():
            assert cfg.model.lucid_layers == ("none" if name.startswith("softmax") else "all")
            assert cfg.model.position_embedding == ("none" if name.endswith("nope") else "rope")
            rest = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"}
            assert rest == {k: v for k, v in dataclasses.asdict(configs["lucid"]).items() if k != "model"}
        mqar = configs["lucid"].data.synth.mqar
        # scored on the trained task at 1x, 2x and 4x the most pairs seen in training
        assert task.eval["pairs"] == [mqar.max_pairs, 2 * mqar.max_pairs, 4 * mqar.max_pairs]
        assert (task.eval["updates"], task.eval["key_vocab"], task.eval["value_vocab"]) == (
            mqar.updates, mqar.key_vocab, mqar.value_vocab)
    assert load_train_config(exp.base, exp.tasks["key_update"].overrides).data.synth.mqar.updates > 1


def test_toy_command_keeps_finished_runs_and_redoes_changed_ones(tmp_path, capsys):
    from lucid_megatron.cli import main

    out = tmp_path / "toy"
    assert main(["experiment", "toy", "--out", str(out), "--steps", "3", "--seeds", "0"]) == 0
    runs = {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    assert set(runs) == {"softmax-seed0.json", "lucid-seed0.json"}
    first = json.loads((out / "toy.json").read_text())
    assert first["config"]["residual"] is False and first["config"]["steps_per_phase"] == 3
    assert set(first["summary"]["lucid/seed0"]["attention_after"]) == {"identity", "cumavg"}
    for name in ("toy.png", "attention.png"):
        assert (out / name).stat().st_size > 1000
    # the same settings again: nothing is retrained, the same results are written
    assert main(["experiment", "toy", "--out", str(out), "--steps", "3", "--seeds", "0"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").iterdir()} == runs
    assert json.loads((out / "toy.json").read_text()) == first
    # other settings: the stored runs do not match, so both are trained again
    assert main(["experiment", "toy", "--out", str(out), "--steps", "4", "--seeds", "0"]) == 0
    assert all(p.stat().st_mtime_ns != runs[p.name] for p in (out / "runs").iterdir())
    assert json.loads((out / "toy.json").read_text())["config"]["steps_per_phase"] == 4
    assert main(["experiment", "toy", "--out", str(out), "--steps", "0"]) == 2
    assert "argument --steps: 0 is not allowed" in capsys.readouterr().err


def test_steps_to_reach_is_the_first_logged_step_below():
    curve = [(0, 0.5), (10, 0.2), (20, 0.05), (30, 0.2), (40, 0.001)]
    assert toy.steps_to_reach(curve, 0.1) == 20 and toy.steps_to_reach(curve, 0.01) == 40
    assert toy.steps_to_reach(curve, 1e-4) is None


CONTEXT_EXTENSION = Path(__file__).resolve().parents[2] / "configs" / "context-extension" / "recipe.yaml"


def test_context_extension_recipe_configs_are_the_recipe_the_docs_state():
    """configs/context-extension: every (attention, variant) config loads; the continuation is 4x the short
    length, starts from a model of the same shapes, and each variant changes RoPE as documented."""
    from lucid_megatron.experiment.extension import SHORT, load_recipe

    recipe = load_recipe(CONTEXT_EXTENSION)  # loads and cross-checks every config
    assert set(recipe.attention) == {"lucid", "softmax"} and list(recipe.variants) == ["unchanged", "larger-base",
                                                                                        "yarn"]
    short = recipe.config("lucid", SHORT, 0)
    assert short.model.rope_scaling.type == "none" and short.model.rotary_base == 10000
    configs = {v: recipe.config("softmax", v, 0) for v in recipe.variants}
    length = short.train.seq_length
    for variant, cfg in configs.items():
        assert cfg.train.seq_length == 4 * length and cfg.model.lucid_layers == "none"
        assert cfg.data.synth.task.max_len == 4 * length and cfg.model.max_seq_len >= max(recipe.eval.niah_lengths)
    assert configs["unchanged"].model.rope_scaling == short.model.rope_scaling
    assert configs["unchanged"].model.rotary_base == short.model.rotary_base
    assert configs["larger-base"].model.rope_scaling.type == "none"
    d = short.model.kv_channels  # the NTK-aware base for a 4x extension: 10000 * 4^(d / (d - 2)), rounded
    assert configs["larger-base"].model.rotary_base == pytest.approx(10000 * 4 ** (d / (d - 2)), rel=0.01)
    yarn = configs["yarn"].model
    assert (yarn.rotary_base, yarn.rope_scaling.type) == (10000, "yarn")
    assert yarn.rope_scaling.original_max_position_embeddings == length
    assert yarn.rope_scaling.factor * length == configs["yarn"].train.seq_length
    assert recipe.eval.niah_lengths == [length, 2 * length, 4 * length, 8 * length]


@pytest.mark.parametrize("change, message", [
    ({"variants": {"short": []}}, "variants: 'short' names the model before extension"),
    ({"variants": {"longer": ["train.seq_length=64"]}}, "softmax/longer: train.seq_length 64 is not longer than"),
    ({"variants": {"wider": ["model.hidden_size=128"]}}, "lucid/wider: model.hidden_size differs from the short"),
    ({"variants": {"bad": ["model.rope_scaling={type: yarn, factor: 4}"]}},
     "lucid/bad: model.rope_scaling.original_max_position_embeddings: required for type 'yarn'"),
    ({"eval": {"niah_lengths": [128], "ppl_docs": [512, 128]}}, "eval.ppl_docs: must be \\[min, max\\]"),
])
def test_context_extension_recipe_errors_name_the_problem(tmp_path, change, message):
    import yaml

    from lucid_megatron.config import ConfigError
    from lucid_megatron.experiment.extension import load_recipe

    spec = yaml.safe_load(CONTEXT_EXTENSION.read_text())
    spec.update(short=str(CONTEXT_EXTENSION.parent / spec["short"]), extend=str(CONTEXT_EXTENSION.parent / spec["extend"]))
    if "variants" in change and "longer" in change["variants"]:
        spec["attention"] = {"softmax": ["model.lucid_layers=none"]}
    spec.update(change)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_long_context_presets_extend_the_2k_run_with_yarn():
    """configs/1b-64k*.yaml and 1b-128k.yaml state the recipe's choice: YaRN over 1b-2k's trained length."""
    from lucid_megatron.config.train import load_train_config

    configs = CONTEXT_EXTENSION.parents[1]
    trained = load_train_config(configs / "1b-2k.yaml").train.seq_length
    for name in ("1b-64k", "1b-64k-mix", "1b-128k"):
        cfg = load_train_config(configs / f"{name}.yaml")
        scaling = cfg.model.rope_scaling
        assert (scaling.type, scaling.original_max_position_embeddings) == ("yarn", trained), name
        assert scaling.factor * trained == cfg.train.seq_length == cfg.model.max_seq_len, name
        assert "RoPE: YaRN" in (configs / f"{name}.yaml").read_text()
