"""The training config schema: presets validate, bad keys and values are named, schedule values."""

import math
import re
import time
from pathlib import Path

import pytest
import yaml

from lucid_megatron.config import ConfigError
from lucid_megatron.config.train import CONFIG_DIR, config_from_dict, dump_config, load_train_config
from lucid_megatron.train.schedule import gradient_accumulation_steps, lr_at, split_world

TRAIN_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_expected_presets_exist():
    assert {"demo.yaml", "125m.yaml", "350m.yaml", "1b-2k.yaml", "1b-64k.yaml"} <= set(TRAIN_CONFIGS)


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_every_config_file_validates(name):
    cfg = load_train_config(CONFIG_DIR / name)
    # and survives a round trip through the resolved dump
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_paper_recipe():
    cfg = load_train_config(CONFIG_DIR / "1b-2k.yaml")
    o = cfg.optimizer
    assert (o.lr, o.beta2, o.eps, o.weight_decay) == (5e-4, 0.99, 1e-12, 0.01)
    assert cfg.schedule.decay == "cosine" and cfg.schedule.warmup_fraction == 0.06
    assert cfg.train.seq_length == 2048
    assert 0.45e6 <= cfg.train.global_batch_size * cfg.train.seq_length <= 0.55e6
    assert cfg.model.hidden_size == 2048 and cfg.model.num_layers == 22
    long = load_train_config(CONFIG_DIR / "1b-64k.yaml")
    assert (long.train.seq_length, long.optimizer.lr, long.train.steps) == (65536, 5e-6, 500)
    assert long.checkpoint.init_from


def test_exponent_floats_without_a_dot_are_floats():
    # YAML 1.1 reads "3e-3" as a string; a float field takes it as the number it spells.
    assert load_train_config(CONFIG_DIR / "demo.yaml", ["optimizer.lr=3e-3"]).optimizer.lr == 0.003


def test_softmax_baseline_is_one_override_away():
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["model.lucid_layers=none"])
    assert cfg.model.layer_is_lucid() == [False] * cfg.model.num_layers


@pytest.mark.parametrize(
    "override,match",
    [
        ("train.stepz=3", r"train.stepz: unknown key; allowed: steps, global_batch_size"),
        # removed when optimizer/ became the only optimizer state (a checkpoint always holds it)
        ("checkpoint.reshardable_optimizer=false", r"checkpoint.reshardable_optimizer: unknown key; allowed: interval, "
                                                   r"keep_last, init_from, async_save"),
        ("checkpoint.async_save=sometimes", r"checkpoint.async_save: expected"),
        ("optimizer.lr=fast", r"optimizer.lr: expected float, got 'fast'"),
        ("train.steps=ten", r"train.steps: expected int, got 'ten'"),
        ("train.zero_stage=4", r"train.zero_stage: 4 is not allowed; allowed: 0, 1, 2, 3"),
        ("train.zero_stage=true", r"train.zero_stage: True is not allowed"),
        ("parallel.tensor_parallel_size=3", r"num_attention_heads \(2\) is not divisible by tensor_parallel_size \(3\)"),
        ("train.global_batch_size=15", r"global_batch_size: 15 is not divisible by micro_batch_size \(8\)"),
        ("model.preset=2b", r"model.preset: '2b' is not a preset; allowed: 125m, 1b"),
        ("model.lucid_layers=every-2", r"model.lucid_layers: unknown pattern"),
        ("data.loss_tokens=some", r"data.loss_tokens: 'some' is not allowed; allowed: 'all', 'answer'"),
        ("bogus.key=1", r"bogus: unknown key; allowed: model, train, data"),
        ("train.seq_length=100000", r"train.seq_length: 100000 exceeds model.max_seq_len"),
        ("steps=3", r"--set expects section.key=value, got 'steps=3'"),
        ('train.profile_steps="5-3"', r"train.profile_steps: '5-3': the steps must satisfy 1 <= A <= B"),
        ('train.profile_steps="a-b"', r"train.profile_steps: 'a-b' is not a step range; write A-B, e.g. 10-12"),
        ("train.hang_timeout_s=0", r"train.hang_timeout_s: must be > 0 or null \(no watchdog\), got 0"),
        ("logging.straggler_factor=1", r"logging.straggler_factor: must be > 1 \(a multiple of the median\), got 1"),
        ("launch.max_restarts=-1", r"launch.max_restarts: must be >= 0, got -1"),
        ("launch.max_same_step_failures=0", r"launch.max_same_step_failures: must be >= 1, got 0"),
        ("data.synth.task.min_len=40", r"data.synth.task: RetrievalTask.min_len=40 cannot hold 4 keys x 1 assignments and 2 queries plus BOS/EOS; the minimum is \d+ byte tokens"),
    ],
)
def test_bad_values_are_named(override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(CONFIG_DIR / "demo.yaml", [override])


def test_layout_checks_need_the_world_size():
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["train.global_batch_size=12", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"global_batch_size: 12 is not divisible by micro_batch_size x data_parallel \(4 x 2\)"):
        split_world(cfg, 2)
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["parallel.tensor_parallel_size=2", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"world size \(3 processes\) is not divisible"):
        split_world(cfg, 3)
    layout = split_world(cfg, 4)
    assert layout.data_parallel == 2 and gradient_accumulation_steps(cfg, layout) == 2


def test_lr_schedule():
    cfg = load_train_config(
        CONFIG_DIR / "demo.yaml",
        ["train.steps=100", "optimizer.lr=1.0", "schedule.warmup_fraction=0.1", "schedule.min_lr_ratio=0.1"],
    )
    assert lr_at(cfg, 1) == pytest.approx(0.1) and lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    # halfway through the decay: cosine midpoint between peak and floor
    assert lr_at(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = load_train_config(CONFIG_DIR / "demo.yaml", ["train.steps=10", "optimizer.lr=1.0",
                                                        "schedule.warmup_fraction=0", "schedule.decay=linear",
                                                        "schedule.min_lr_ratio=0"])
    assert [round(lr_at(lin, s), 6) for s in (1, 5, 10)] == [0.9, 0.5, 0.0]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(Path("no/such/config.yaml"))


def test_context_parallel_that_cannot_be_honoured_is_refused():
    # demo: 2 heads, 2 KV heads
    with pytest.raises(ConfigError, match=r"cp_comm_type='a2a' splits heads over an all-to-all group: the attention "
                                          r"heads per TP rank \(2\) must be divisible by context_parallel_size \(3\)"
                                          r".*use cp_comm_type='p2p', or 'a2a\+p2p'"):
        load_train_config(CONFIG_DIR / "demo.yaml", ["parallel.context_parallel_size=3", "parallel.cp_comm_type=a2a"])
    with pytest.raises(ConfigError, match=r"cp_comm_type: 'ring' is not allowed; allowed: 'a2a', 'p2p', 'a2a\+p2p'"):
        load_train_config(CONFIG_DIR / "demo.yaml", ["parallel.cp_comm_type=ring"])
    # p2p needs no head split: 3 context-parallel ranks are fine, and the world must hold them
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["parallel.context_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"world size \(2 processes\) is not divisible by tensor_parallel_size x "
                                          r"context_parallel_size \(1 x 3\)"):
        split_world(cfg, 2)
    assert split_world(cfg, 3).data_parallel == 1


@pytest.mark.parametrize(("overrides", "match"), [
    (["parallel.hierarchical_context_parallel_sizes=[2, 2]"],
     r"hierarchical_context_parallel_sizes: \[2, 2\] is only used with cp_comm_type='a2a\+p2p' \(got "
     r"cp_comm_type='p2p'\)"),
    ([], r"hierarchical_context_parallel_sizes: cp_comm_type='a2a\+p2p' needs \[a2a group size, number of groups\]"),
    (["parallel.hierarchical_context_parallel_sizes=[2, 3]"],
     r"\[2, 3\] multiplies to 6, not context_parallel_size \(4\)"),
    (["parallel.hierarchical_context_parallel_sizes=[1, 4]"], r"a level of size 1.*use cp_comm_type='p2p'"),
    (["parallel.hierarchical_context_parallel_sizes=[4, 1]"], r"a level of size 1.*use cp_comm_type='a2a'"),
    (["parallel.context_parallel_size=8", "parallel.hierarchical_context_parallel_sizes=[4, 2]"],
     r"cp_comm_type='a2a\+p2p' splits heads over an all-to-all group: the attention heads per TP rank \(2\) must be "
     r"divisible by the a2a group size, hierarchical_context_parallel_sizes\[0\] \(4\).*use a smaller a2a group"),
])
def test_a_hierarchical_layout_that_cannot_work_is_refused(overrides, match):
    base = ["parallel.context_parallel_size=4"]
    if "parallel.hierarchical_context_parallel_sizes=[2, 2]" not in overrides:
        base.append("parallel.cp_comm_type=a2a+p2p")
    with pytest.raises(ConfigError, match=match):
        load_train_config(CONFIG_DIR / "demo.yaml", base + overrides)


def test_a_hierarchical_layout_that_works_is_accepted():
    cfg = load_train_config(CONFIG_DIR / "demo.yaml", ["parallel.context_parallel_size=4",
                                                        "parallel.cp_comm_type=a2a+p2p",
                                                        "parallel.hierarchical_context_parallel_sizes=[2, 2]"])
    assert cfg.parallel.a2a_group_size == 2 and split_world(cfg, 8).data_parallel == 2


# ---- hostile and broken config files -------------------------------------------------------------


def _demo_text() -> str:
    return (CONFIG_DIR / "demo.yaml").read_text()


@pytest.mark.parametrize("content,message", [
    ("train: {steps: 3\n", "invalid YAML at line 2"),
    ("model: !!python/object/apply:os.system ['echo owned']\n", "invalid YAML at line 1, column 8"),
    (b"train:\n  steps: 3 \xff\xfe\n", "is not UTF-8 text (byte 0xff at offset 18)"),
    ("- a\n- b\n", "a training config must be a mapping of sections, got ['a', 'b']"),
])
def test_broken_config_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(path, ["train.steps=3"])


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; give a YAML file"):
        load_train_config(tmp_path)


def test_a_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    lines.append("model: *a8")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_bytes()) < 1024
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_train_config(path)
    assert "expands to more than 100000 values" in str(err.value) and len(str(err.value)) < 300
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("override,message", [
    ("optimizer.lr=.inf", "optimizer.lr: expected a finite number, got inf"),
    ("optimizer.grad_clip=.nan", "optimizer.grad_clip: expected a finite number, got nan"),
    ("model.init_std=-.inf", "model.init_std: expected a finite number, got -inf"),
    ("train.seed=-1", "train.seed: must be in [0, 2**32), got -1"),
    ("train.steps=[1, {a: 2}]", "train.steps: expected int, got [1, {'a': 2}]"),
    ("train.steps={", "--set train.steps: invalid YAML"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(yaml.safe_load(_demo_text()), [override])


def test_a_huge_value_gives_a_short_message():
    with pytest.raises(ConfigError) as err:
        config_from_dict(yaml.safe_load(_demo_text()), ["train.steps=" + "x" * 100_000])
    assert len(str(err.value)) < 300


def test_bf16_without_zero_is_refused():
    with pytest.raises(ConfigError, match="train.precision: bf16 needs zero_stage >= 1: at stage 0 DeepSpeed"):
        config_from_dict(yaml.safe_load(_demo_text()), ["train.precision=bf16", "train.zero_stage=0"])
