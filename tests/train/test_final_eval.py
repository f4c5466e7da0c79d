"""final_eval: a run that reaches its last step scores retrieval on its final checkpoint, with the numbers
`lucid eval niah` gives for the same settings; a run stopped before it (train.stop_at_step) is not scored."""

import json
import math
import os
import signal
import subprocess

import pytest
import yaml

import psutil

from lucid_megatron.runtime.commands import NiahOptions, niah_command, process_command

from .runs import BASE_CONFIG, run_train, train_command, train_env

# Two keys, so both chance levels apply: guess the 2-digit value (0.01) or copy a random key's value (0.5).
TASK = {"min_len": 48, "max_len": 64, "num_needles": 2, "num_queries": 1, "key_len": 1, "value_len": 2,
        "filler_words": 4}
FINAL_EVAL = {"lengths": [48, 64], "num_samples": 12, "batch_size": 5, "seed": 3}
# The same settings spelled as `lucid eval niah` options (the task's defaults written out where they matter).
NIAH_OPTIONS = NiahOptions(lengths=[48, 64], needles=2, queries=1, key_len=1, value_len=2, filler_words=4,
                           num_samples=12, batch_size=5, seed=3)


def _config(tmp_path):
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["data"].update(path=str(tmp_path / "synth"),
                       synth={"task": TASK, "train_docs": 200, "valid_docs": 16, "docs_per_shard": 50})
    cfg["train"]["steps"] = 4
    cfg["final_eval"] = FINAL_EVAL
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_final_eval_scores_the_finished_run_as_lucid_eval_niah_does(tmp_path):
    config, run_dir = _config(tmp_path), tmp_path / "run"

    stopped = run_train(config, run_dir, overrides=["train.stop_at_step=2"])
    assert "lucid train: final_eval" not in stopped.stdout and not (run_dir / "eval").exists()

    finished = run_train(config, run_dir, resume="auto")  # steps 3-4, then the evaluation
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    results = json.loads((run_dir / "eval" / "niah.json").read_text())
    assert results["checkpoint"] == str(checkpoint)
    assert results["chance"] == {"guess_value": pytest.approx(0.01), "guess_answer_loss": pytest.approx(math.log(10)),
                                 "random_key_value": 0.5}
    assert (run_dir / "eval" / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    reference_out = tmp_path / "reference.json"
    command = process_command(niah_command(NIAH_OPTIONS, checkpoints=[checkpoint], out=reference_out))
    reference = subprocess.run(command, capture_output=True, text=True, timeout=300, env=train_env())
    assert reference.returncode == 0, reference.stderr[-4000:]
    reference = json.loads(reference_out.read_text())
    assert results["task"] == reference["task"]
    (got,), (want,) = results["models"].values(), reference["models"].values()
    assert list(results["models"]) == ["LUCID"] and set(got) == {"48", "64"}
    for length in ("48", "64"):
        for key in ("exact_match", "token_accuracy", "queries"):
            assert got[length][key] == want[length][key], (length, key)
        # the same computation on the same checkpoint: equal up to float formatting
        assert got[length]["answer_loss"] == pytest.approx(want[length]["answer_loss"], rel=1e-9)

    # the printed table: one row per length with its exact match and both chance levels
    lines = [line.removeprefix("lucid train: ").split() for line in finished.stdout.splitlines()]
    rows = {cells[0]: cells for cells in lines if cells[:1] in (["48"], ["64"])}
    for length in ("48", "64"):
        assert rows[length][1] == f"{got[length]['exact_match']:.3f}"
        assert rows[length][-2:] == ["0.01", "0.5"]
    assert f"plot {run_dir / 'eval' / 'niah.png'}" in finished.stdout


def test_a_warning_signal_during_the_evaluation_leaves_it_to_the_resumed_run(tmp_path):
    """SLURM's warning (SIGUSR1) while final_eval runs: the child is stopped, the run is marked preempted at its
    last step (a job script requeues it) and exits 0; the resumed run has nothing to train and evaluates."""
    config, run_dir = _config(tmp_path), tmp_path / "run"
    train = subprocess.Popen(train_command(config, run_dir, overrides=["train.steps=2"]), env=train_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    for line in train.stdout:
        printed.append(line)
        if "lucid train: final_eval: retrieval on" in line:
            os.kill(train.pid, signal.SIGUSR1)
            break
    out, err = train.communicate(timeout=300)
    printed.append(out)
    assert train.returncode == 0, "".join(printed) + err[-4000:]
    assert "received SIGUSR1 during the evaluation: stopped it" in "".join(printed)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "preempted"
    assert json.loads((run_dir / "status.json").read_text())["step"] == 2
    assert not (run_dir / "eval" / "niah.json").exists()
    orphans = [p.pid for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert orphans == []

    resumed = run_train(config, run_dir, overrides=["train.steps=2"], resume="auto")
    assert "nothing to do" in resumed.stdout and "final_eval: plot" in resumed.stdout
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert json.loads((run_dir / "eval" / "niah.json").read_text())["checkpoint"] == str(
        run_dir / "checkpoints" / "step_00000002")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["final_eval.lengths=[160, 40]"], r"final_eval.lengths: \[40\] cannot hold 4 keys x 1 assignments and 2 "
                                           r"queries; the minimum is 78 tokens"),
        (["final_eval.lengths=[]"], r"final_eval.lengths: give at least one context length"),
        (["final_eval.lengths=[160, 160]"], r"final_eval.lengths: \[160\] given more than once"),
        (["final_eval.num_samples=0"], r"final_eval.num_samples: must be >= 1, got 0"),
        (["final_eval.task.num_queries=5"], r"final_eval.task: RetrievalTask.num_queries=5 exceeds num_needles=4"),
        (["data.synth=null"], r"final_eval.task: required when data.synth is not set"),
    ],
)
def test_bad_final_eval_values_are_named(overrides, match):
    from lucid_megatron.config.schema import ConfigError
    from lucid_megatron.config.train import CONFIG_DIR, load_train_config

    with pytest.raises(ConfigError, match=match):
        load_train_config(CONFIG_DIR / "demo.yaml", overrides)


def test_the_demo_asks_its_training_task_at_its_length_and_twice_it():
    from lucid_megatron.config.train import CONFIG_DIR, load_train_config
    from lucid_megatron.train.final_eval import chance, niah_arguments

    cfg = load_train_config(CONFIG_DIR / "demo.yaml")
    assert cfg.final_eval.lengths == [cfg.train.seq_length, 2 * cfg.train.seq_length]
    assert cfg.final_eval_task() == cfg.data.synth.task
    # 1-digit values from 10 digits; 4 keys of which one is asked per query
    assert chance(cfg.final_eval_task()) == {"guess_value": pytest.approx(0.1),
                                             "guess_answer_loss": pytest.approx(math.log(10)),
                                             "random_key_value": 0.25}
    arguments = niah_arguments(cfg, "CKPT", "OUT", "PLOT")
    assert arguments[arguments.index("--needles") + 1] == "4" and arguments[arguments.index("--queries") + 1] == "2"
