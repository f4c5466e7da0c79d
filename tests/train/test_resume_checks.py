"""A resume continues one run: what defines it (model, tokenizer, data, stream order, LR schedule) is compared with
the checkpoint before any process starts; a change is refused in one line, or made on purpose with --allow-change.

One tiny run (stopped at step 2 of 4) is trained once; the checks run `lucid train`'s preflight in this process on
its checkpoint, and one real resume shows what an allowed change does."""

import json
import shutil
import subprocess

import pytest
import yaml

from lucid_megatron.cli import build_parser
from lucid_megatron.config import ConfigError
from lucid_megatron.config.train import CONFIG_DIR, load_train_config
from lucid_megatron.runtime.commands import train_command as train_arguments
from lucid_megatron.train.cli import preflight
from lucid_megatron.train.run_state import DataRecord
from lucid_megatron.train.schedule import lr_at
from lucid_megatron.train.validate import open_dataset

from .runs import run_train, small_training_config, train_command, train_env, train_records

RUN = ["train.steps=4", "train.stop_at_step=2"]  # the run's config: BASE_CONFIG (runs.py) with these
CHECKPOINT = "step_00000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, run dir): the tiny model trained 2 steps of 4 on the small synthetic dataset, checkpoint at step 2."""
    root = tmp_path_factory.mktemp("resume-checks")
    config = small_training_config(root)
    run_dir = root / "run"
    run_train(config, run_dir, overrides=RUN)
    return config, run_dir


def _copy_dataset(config, where, **manifest_changes):
    """A copy of the run's dataset whose manifest.json differs by ``manifest_changes`` (none: the same dataset,
    moved)."""
    source = load_train_config(config).data.path
    shutil.copytree(source, where)
    manifest = json.loads((where / "manifest.json").read_text())
    for key, value in manifest_changes.items():
        manifest[key] = {**manifest[key], **value}
    (where / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return where


def _preflight(trained, overrides=(), allow_change=(), world_size=1, resume="auto"):
    config, run_dir = trained
    cfg = load_train_config(config, [*RUN, *overrides])
    return preflight(cfg, run_dir, resume, world_size, allow_change)


def _refusal(trained, overrides=(), allow_change=()) -> str:
    with pytest.raises(ConfigError) as err:
        _preflight(trained, overrides, allow_change)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- the model and the tokenizer: no --allow-change, a new run from the weights ------------------------------


@pytest.mark.parametrize(("override", "named"), [
    ("model.lucid_layers=none", "model.lucid_layers: checkpoint 'all', config 'none'"),
    ("model.lucid_layers=every:2", "model.lucid_layers: checkpoint 'all', config 'every:2'"),
    ("model.position_embedding=none", "model.position_embedding: checkpoint 'rope', config 'none'"),
    ("model.rotary_base=500000.0", "model.rotary_base: checkpoint 10000.0, config 500000.0"),
    ("model.rope_scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 64}",
     "model.rope_scaling: checkpoint RopeScaling(type='none'), config RopeScaling(type='yarn', factor=4.0, "
     "original_max_position_embeddings=64)"),
    ("model.norm_eps=1.0e-6", "model.norm_eps: checkpoint 1e-05, config 1e-06"),
    ("model.lucid_eps=1.0e-5", "model.lucid_eps: checkpoint 1e-06, config 1e-05"),
    ("model.vocab_size=300", "model.vocab_size: checkpoint 259, config 300"),  # the same padded size: no shape
])
def test_a_model_that_computes_another_function_is_refused(trained, override, named):
    message = _refusal(trained, [override])
    assert message.startswith(f"--resume: {trained[1]}/checkpoints/{CHECKPOINT} was trained with another model ("
                              f"{named}); a run keeps its model on resume")
    assert f"--set checkpoint.init_from={trained[1]}/checkpoints/{CHECKPOINT} and another --run-dir" in message


def test_kv_heads_are_a_shape(trained):
    message = _refusal(trained, ["model.num_kv_heads=4"])
    assert "holds a model of other shapes than the config (model.num_kv_heads: config 4, checkpoint 2)" in message


def test_the_same_model_spelled_otherwise_resumes(trained):
    """num_kv_heads 2 is the tiny preset's value; head_dim 16 is 64 / 4 heads; layers [1, 2] are 'all'."""
    _preflight(trained, ["model.head_dim=16", "model.lucid_layers=[1, 2]", "model.max_seq_len=1024",
                         "model.init_std=0.5"])


def test_another_tokenizer_is_refused(trained, tmp_path):
    other = _copy_dataset(trained[0], tmp_path / "other", tokenizer={"name": "byte-v2", "pad_id": 0})
    message = _refusal(trained, [f"data.path={other}"])
    assert message.startswith("--resume: tokenizers differ (name byte-v1 vs byte-v2, pad 258 vs 0): the checkpoint ")
    assert f"the dataset {other} was made with byte-v2" in message
    assert "train on data made with the checkpoint's tokenizer, or start a new run from these weights" in message


# ---- the data: --allow-change data.path drops the positions -------------------------------------------------


def test_another_dataset_is_refused_and_can_be_allowed(trained, tmp_path):
    other = _copy_dataset(trained[0], tmp_path / "other", source={"note": "re-prepared"})
    message = _refusal(trained, [f"data.path={other}"])
    assert message.startswith("--resume: data.path: the data differs from what ")
    assert f"config {other} [manifest sha256 " in message
    assert message.endswith("or pass --allow-change data.path to train on this data from its start (the saved data "
                            "positions are dropped)")
    plan = _preflight(trained, [f"data.path={other}"], ["data.path"])
    assert not plan.keep_data_positions and plan.notes[0].endswith("read from its start (the saved data positions "
                                                                   "are dropped)")


def test_a_moved_dataset_is_the_same_dataset(trained, tmp_path):
    moved = _copy_dataset(trained[0], tmp_path / "moved")
    plan = _preflight(trained, [f"data.path={moved}"])
    assert plan.keep_data_positions and plan.notes == []


@pytest.mark.parametrize(("override", "named"), [
    ("data.num_streams=2", "data.num_streams: checkpoint 4, config 2"),
    ("train.seed=7", "train.seed: checkpoint 1234, config 7"),
    ("data.shuffle_shards=false", "data.shuffle_shards: checkpoint True, config False"),
])
def test_another_stream_order_is_refused_before_the_model_is_built(trained, override, named):
    message = _refusal(trained, [override])
    assert message.startswith(f"--resume: {named}; the saved data positions of ")
    assert "only hold for the stream order they were read in: resume with " in message


def test_the_layout_and_the_rows_may_change(trained):
    """A resharding resume (2 data-parallel ranks instead of 1) and other rows: no flag needed."""
    plan = _preflight(trained, ["train.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=16",
                                "train.zero_stage=1", "optimizer.weight_decay=0.1"], world_size=2)
    assert plan.keep_data_positions and plan.notes == [] and plan.step == 2


# ---- a mixture: the weights may change (positions kept), the sources too (positions dropped) ------------------


@pytest.fixture
def mixture(trained, tmp_path):
    """(overrides of a two-source mixture, the checkpoint's copy recording that mixture at weights 0.5/0.5)."""
    config, run_dir = trained
    web = load_train_config(config).data.path
    books = _copy_dataset(config, tmp_path / "books", source={"note": "books"})
    sources = [{"path": web, "name": "web", "weight": 0.5}, {"path": str(books), "name": "books", "weight": 0.5}]
    overrides = ["data.path=", f"data.sources={json.dumps(sources)}"]
    cfg = load_train_config(config, [*RUN, *overrides])
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run_dir / "checkpoints" / CHECKPOINT, checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    state.update(DataRecord.of(cfg, open_dataset(cfg)).state_dict(), data={})
    (checkpoint / "state.json").write_text(json.dumps(state))
    return sources, checkpoint


def _mixture_preflight(trained, tmp_path, sources, checkpoint, allow_change=()):
    cfg = load_train_config(trained[0], [*RUN, "data.path=", f"data.sources={json.dumps(sources)}"])
    return preflight(cfg, tmp_path / "new-run", str(checkpoint), 1, allow_change)


def test_new_mixture_weights_keep_the_positions(trained, tmp_path, mixture):
    sources, checkpoint = mixture
    sources[0]["weight"] = 0.8
    with pytest.raises(ConfigError, match=r"^--resume: data.sources: the weights differ from .* \(checkpoint web 0.5, "
                                          r"books 0.5; config web 0.8, books 0.5\); .* --allow-change data.sources to "
                                          r"continue with these \(the saved data positions are kept"):
        _mixture_preflight(trained, tmp_path, sources, checkpoint)
    plan = _mixture_preflight(trained, tmp_path, sources, checkpoint, ["data.sources"])
    assert plan.keep_data_positions
    assert plan.notes == ["data.sources: weights web 0.5, books 0.5 -> web 0.8, books 0.5: each source continues "
                          "where it stopped (the saved data positions are kept)"]


def test_another_source_drops_the_positions(trained, tmp_path, mixture):
    sources, checkpoint = mixture
    sources[1]["path"] = str(_copy_dataset(trained[0], tmp_path / "code", source={"note": "code"}))
    with pytest.raises(ConfigError, match=r"^--resume: data.sources: the data differs from what .* --allow-change "
                                          r"data.sources to train on this data from its start"):
        _mixture_preflight(trained, tmp_path, sources, checkpoint)
    plan = _mixture_preflight(trained, tmp_path, sources, checkpoint, ["data.sources"])
    assert not plan.keep_data_positions


# ---- the LR schedule: --allow-change says what the next step's lr becomes ------------------------------------


SCHEDULE_CHANGES = {
    "train.steps": ("8", 4),
    "optimizer.lr": ("1.0e-3", 3.0e-3),
    "schedule.warmup_fraction": ("0.75", 0.2),
    "schedule.decay": ("linear", "cosine"),
    "schedule.min_lr_ratio": ("0.0", 0.1),
}


@pytest.mark.parametrize("field", list(SCHEDULE_CHANGES))
def test_a_schedule_change_is_refused_then_allowed_saying_the_next_lr(trained, field):
    value, saved = SCHEDULE_CHANGES[field]
    new_cfg = load_train_config(trained[0], [*RUN, f"{field}={value}"])
    new = getattr(getattr(new_cfg, field.split(".")[0]), field.split(".")[1])
    effect = (f"the lr at step 3 {{}} {lr_at(new_cfg, 3):.3e} (was {lr_at(load_train_config(trained[0], RUN), 3):.3e})"
              .replace("e-0", "e-"))
    message = _refusal(trained, [f"{field}={value}"])
    assert message.startswith(f"--resume: the LR schedule differs from {trained[1]}/checkpoints/{CHECKPOINT}'s "
                              f"({field}: {saved!r} -> {new!r}; {effect.format('would become')}")
    assert message.endswith(f"pass --allow-change {field} to continue on the new schedule")
    plan = _preflight(trained, [f"{field}={value}"], [field])
    assert plan.notes[0].startswith(f"{field}: {saved!r} -> {new!r}: {effect.format('becomes')}")
    assert plan.keep_data_positions


def test_a_schedule_back_in_warmup_says_so(trained):
    plan = _preflight(trained, ["schedule.warmup_fraction=0.75"], ["schedule.warmup_fraction"])
    assert plan.notes[0].endswith(", inside the new warmup (to step 3)")


def test_a_schedule_that_ends_before_the_next_step_says_so(trained):
    message = _refusal(trained, ["train.steps=2"])
    assert "(train.steps: 4 -> 2; the new schedule ends at step 2: nothing is left to train)" in message


# ---- --allow-change itself ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "allow", "message"), [
    ([], ["model.lucid_layers"], "--allow-change: model.lucid_layers cannot change on resume; allowed: optimizer.lr, "
                                 "train.steps, schedule.warmup_fraction, schedule.decay, schedule.min_lr_ratio, "
                                 "data.path, data.sources"),
    ([], ["train.stepz"], "--allow-change: train.stepz cannot change on resume; allowed: optimizer.lr"),
    (["train.steps=8"], ["train.steps", "optimizer.lr"], "--allow-change: optimizer.lr is the same in "),
    ([], ["train.steps"], "so there is nothing to allow; fields that changed: none"),
])
def test_allowing_what_cannot_or_did_not_change_is_an_error(trained, overrides, allow, message):
    assert message in _refusal(trained, overrides, allow)


def test_allowing_a_change_without_a_checkpoint_is_an_error(trained, tmp_path):
    cfg = load_train_config(trained[0], RUN)
    with pytest.raises(ConfigError, match=r"^--allow-change: no checkpoint is resumed \(a fresh run\)"):
        preflight(cfg, tmp_path / "fresh", "auto", 1, ["train.steps"])


def test_allow_change_reaches_the_torchrun_workers(tmp_path):
    """The command torchrun starts for each worker carries --allow-change, and lucid's parser reads it back."""
    arguments = train_arguments(CONFIG_DIR / "demo.yaml", tmp_path / "run", resume="auto",
                                allow_change=["train.steps", "data.path"], overrides=["train.steps=8"])
    assert arguments[arguments.index("--allow-change"):] == ["--allow-change", "train.steps", "data.path", "--set",
                                                             "train.steps=8"]
    args = build_parser("train").parse_args(arguments)
    assert args.allow_change == ["train.steps", "data.path"] and args.overrides == ["train.steps=8"]


# ---- through `lucid train`, for real --------------------------------------------------------------------------


def test_lucid_train_refuses_in_one_line_before_any_process_starts(trained):
    config, run_dir = trained
    before = sorted(p.name for p in run_dir.iterdir())
    result = subprocess.run(train_command(config, run_dir, overrides=[*RUN, "model.lucid_layers=none"], resume="auto"),
                            capture_output=True, text=True, timeout=300, env=train_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("lucid train: error: --resume: ") and "model.lucid_layers" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_an_allowed_resume_changes_what_it_said_and_keeps_the_old_config(trained, tmp_path):
    """train.steps 4 -> 6 and a re-prepared copy of the dataset: the run says both changes, trains step 3 on the new
    curve and on the new data from its start (the rows of the first run's step 1), and keeps the first config."""
    config, first = trained
    run_dir = tmp_path / "run"
    shutil.copytree(first, run_dir)
    other = _copy_dataset(config, tmp_path / "other", source={"note": "re-prepared"})
    overrides = ["train.steps=6", f"data.path={other}", "logging.tensorboard=false"]
    result = subprocess.run(
        train_command(config, run_dir, overrides=overrides, resume="auto") + ["--allow-change", "train.steps",
                                                                              "data.path"],
        capture_output=True, text=True, timeout=600, env=train_env())
    assert result.returncode == 0, result.stderr[-4000:]
    new_cfg = load_train_config(config, overrides)
    said = [line for line in result.stdout.splitlines() if "changed on resume (--allow-change)" in line]
    assert len(said) == 2 and "train.steps: 4 -> 6: the lr at step 3 becomes" in said[1]
    assert "the saved data positions are dropped" in said[0]
    records, original = train_records(run_dir), train_records(first)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[3]["lr"] == pytest.approx(lr_at(new_cfg, 3), rel=1e-12)
    assert records[3]["data_digest"] == original[1]["data_digest"]  # the new data, read from its start
    assert yaml.safe_load((run_dir / f"config.step_{2:08d}.yaml").read_text())["train"]["steps"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 6
    done = result.stdout.strip().splitlines()[-1]
    assert done.startswith("lucid train: done: 6 steps.") and "tensorboard" not in done.lower()
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["dataset"]["sources"][0]["path"] == str(other) and state["lr_schedule"]["total_steps"] == 6


def test_the_checkpoint_records_its_data(trained):
    """state.json's dataset record: the manifest's digest and the stream order (num_streams, seed, shuffling)."""
    config, run_dir = trained
    state = json.loads((run_dir / "checkpoints" / CHECKPOINT / "state.json").read_text())
    cfg = load_train_config(config, RUN)
    assert state["dataset"] == DataRecord.of(cfg, open_dataset(cfg)).state_dict()["dataset"]
    assert state["dataset"]["num_streams"] == 4 and len(state["dataset"]["sources"][0]["digest"]) == 64
