"""`lucid experiment repro` (a seconds-long smoke of the real experiment file) and the attention-sink toy."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lucid_megatron.experiment import toy
from lucid_megatron.experiment.repro import aggregate, load_experiment, markdown_table
from tests.train.runs import train_env

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = REPO / "configs" / "repro" / "experiment.yaml"
SMOKE = ["train.steps=2", "data.synth.train_docs=64", "data.synth.valid_docs=8", "data.synth.docs_per_shard=16",
         "data.eval_rows=2", "checkpoint.interval=0"]


def _repro(out: Path, data: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lucid_megatron", "experiment", "repro", str(EXPERIMENT), "--out", str(out),
               "--only", "softmax", "lucid", "--seeds", "0", "--eval-samples", "2", "--jobs", "2"]
    for assignment in [*SMOKE, f"data.path={data}"]:
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=train_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_repro_smoke_writes_table_and_plots_and_resumes(tmp_path):
    out = tmp_path / "repro"
    first = _repro(out, tmp_path / "data")
    assert "softmax seed 0 done" in first.stdout and "lucid seed 0 done" in first.stdout
    results = json.loads((out / "results.json").read_text())
    exp = load_experiment(EXPERIMENT)
    lengths = [str(n) for n in exp.eval["lengths"]]
    for condition in ("softmax", "lucid"):
        row = results["summary"][condition]["exact_match"]
        assert list(row) == lengths
        for n in lengths:
            per_seed = row[n]["per_seed"]
            assert len(per_seed) == 1 and 0.0 <= per_seed[0] <= 1.0 and row[n]["std"] == 0.0
            niah = json.loads((out / "runs" / condition / "seed0" / "niah.json").read_text())
            assert next(iter(niah["models"].values()))[n]["exact_match"] == row[n]["mean"]
    # the softmax condition really is the baseline: its command switches LUCID off, LUCID's does not
    assert "model.lucid_layers=none" in (out / "runs" / "softmax" / "seed0" / "command.txt").read_text()
    assert "lucid_layers" not in (out / "runs" / "lucid" / "seed0" / "command.txt").read_text()
    table = (out / "table.md").read_text()
    assert table.count("\n| softmax |") == 1 and table.count("\n| lucid |") == 1
    for plot in exp.plots:
        assert (out / f"{plot}.png").stat().st_size > 1000
    # a second call finds every run finished and rebuilds the same results without training
    second = _repro(out, tmp_path / "data")
    assert "seed 0 done" not in second.stdout
    assert json.loads((out / "results.json").read_text()) == results


def test_aggregate_is_mean_and_sample_std_over_seeds():
    runs = {"a": {0: {"exact_match": {8: 0.25}, "final_valid_loss": 1.0},
                  1: {"exact_match": {8: 0.5}, "final_valid_loss": 2.0},
                  2: {"exact_match": {8: 1.0}, "final_valid_loss": 3.0}}}
    summary = aggregate(runs, [8])
    values = np.array([0.25, 0.5, 1.0], dtype=np.float64)
    assert summary["a"]["exact_match"][8]["mean"] == pytest.approx(values.mean(), abs=1e-15)
    assert summary["a"]["exact_match"][8]["std"] == pytest.approx(values.std(ddof=1), abs=1e-15)
    assert summary["a"]["valid_loss"] == pytest.approx(2.0)
    table = markdown_table(summary, [8], (4, 8))
    assert "| a | 58.3 ± 38.2 | 2.000 |" in table and "| 8* |" in table.replace(" | valid loss", "")


@pytest.mark.parametrize("text, message", [
    ("base: base.yaml\nseeds: []\nconditions: {a: {}}\neval: {lengths: [8]}\n", "seeds=[]"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\nplots: {p: [b]}\n", "unknown conditions ['b']"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8], depth: 3}\n", "eval.depth: unknown key"),
    ("base: base.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {needles: 2}\n", "eval: missing required key"),
    ("base: base.yaml\nseeds: [0, x]\nconditions: {a: {}}\neval: {lengths: [8]}\n", "seeds[1]: expected int"),
    ("base: nowhere.yaml\nseeds: [0]\nconditions: {a: {}}\neval: {lengths: [8]}\n", "does not exist"),
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
    want = np.mean([1.0 / (i + 1) for i in range(1, cfg.vocab)], dtype=np.float64)
    assert toy.first_token_attention(model, tokens) == pytest.approx(want, rel=1e-6)


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
        curves, sink = toy.train_toy(cfg, attention)
        assert 0.0 <= sink["identity"] <= 1.0 and 0.0 <= sink["cumavg"] <= 1.0
        assert curves["identity"][-1][1] < 0.2 * curves["identity"][0][1], (attention, curves["identity"])
        assert len(curves["cumavg"]) == len(curves["identity"])


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
    assert max(exp.eval["lengths"]) >= 4 * task.max_len and min(exp.eval["lengths"]) <= task.max_len
