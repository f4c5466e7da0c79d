"""`lucid launch slurm` places context parallelism's head all-to-all inside a node before submitting
(no cluster needed: the checks run before sbatch, in a dry run), and the 1b-128k preset passes them."""

from pathlib import Path

import pytest

from lucid_megatron.cli import main
from lucid_megatron.config.train import CONFIG_DIR, load_train_config
from lucid_megatron.launch.node_layout import check_placement, fitting_a2a_group_size
from lucid_megatron.train.schedule import gradient_accumulation_steps, split_world

PRESET = CONFIG_DIR / "1b-128k.yaml"
DEMO = CONFIG_DIR / "demo.yaml"  # 2 heads, 2 KV heads


def _dry_run(capsys, tmp_path: Path, config: Path, nodes: int, nproc: int, *overrides: str):
    argv = ["launch", "slurm", "--nodes", str(nodes), "--gpus-per-node", str(nproc), str(config),
            "--run-dir", str(tmp_path / "run"), "--dry-run"]
    for assignment in overrides:
        argv += ["--set", assignment]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_1b_128k_preset_fits_8_nodes_of_8_gpus(capsys, tmp_path):
    cfg = load_train_config(PRESET)
    assert cfg.model.hidden_size == 2048 and cfg.model.num_layers == 22  # the paper's 1b shape
    assert cfg.train.seq_length == cfg.model.max_seq_len == 131072
    assert (cfg.parallel.cp_comm_type, cfg.parallel.hierarchical_context_parallel_sizes) == ("a2a+p2p", [4, 4])
    assert cfg.parallel.a2a_group_size == 4 and cfg.launch.nproc_per_node == 8
    layout = split_world(cfg, 64)
    assert (layout.data_parallel, gradient_accumulation_steps(cfg, layout)) == (4, 1)
    assert 0.5e6 <= cfg.train.global_batch_size * cfg.train.seq_length <= 0.55e6
    assert check_placement(cfg, nodes=8, nproc_per_node=8) == []

    code, out, err = _dry_run(capsys, tmp_path, PRESET, 8, 8)
    assert code == 0 and err == "", err
    assert "#SBATCH --nodes=8" in out and "NPROC_PER_NODE=8" in out
    assert not (tmp_path / "run").exists()


def test_an_a2a_group_that_would_straddle_nodes_is_refused(capsys, tmp_path):
    # 16 nodes x 4 GPUs: an a2a group of 8 ranks would span 2 nodes; groups of 4 (the preset's) fit.
    one_group_per_8 = "parallel.hierarchical_context_parallel_sizes=[8, 2]"
    code, out, err = _dry_run(capsys, tmp_path, PRESET, 16, 4, one_group_per_8)
    assert code == 2 and out == ""
    assert ("lucid launch: error: parallel.hierarchical_context_parallel_sizes: [8, 2] puts each head all-to-all "
            "on tensor_parallel_size x a2a group size = 1 x 8 = 8 consecutive ranks, which do not fit inside one "
            "node of 4 process(es)") in err
    assert "choose parallel.hierarchical_context_parallel_sizes=[4, 4]" in err
    assert "or run a multiple of 8 processes per node" in err
    # the suggestion is accepted for the same nodes
    code, _, err = _dry_run(capsys, tmp_path, PRESET, 16, 4, "parallel.hierarchical_context_parallel_sizes=[4, 4]")
    assert code == 0 and err == "", err
    # TP counts too: TP 2 x a2a 8 = 16 ranks do not fit a node of 8; TP 2 x 4 do
    code, _, err = _dry_run(capsys, tmp_path, PRESET, 8, 8, "parallel.tensor_parallel_size=2",
                            "parallel.context_parallel_size=16", one_group_per_8)
    assert code == 2 and "= 2 x 8 = 16 consecutive ranks" in err
    assert "hierarchical_context_parallel_sizes=[4, 4]" in err


def test_with_no_fitting_group_the_launcher_says_to_use_p2p(tmp_path):
    # demo: 2 heads; a2a group of 2 on nodes of 1 process -> no a2a group fits a node
    cfg = load_train_config(DEMO, ["parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p",
                                   "parallel.hierarchical_context_parallel_sizes=[2, 2]"])
    split_world(cfg, 4)
    assert fitting_a2a_group_size(cfg, 1) is None
    with pytest.raises(ValueError, match=r"no a2a group size fits both the heads and a node of 1 process\(es\) "
                                         r"with tensor_parallel_size 1: use parallel.cp_comm_type=p2p"):
        check_placement(cfg, nodes=4, nproc_per_node=1)
    assert check_placement(cfg, nodes=2, nproc_per_node=2) == []
    assert check_placement(cfg, nodes=1, nproc_per_node=4) == []


def test_the_largest_group_the_heads_allow_is_suggested():
    # 1b (32 heads, 4 KV heads) with CP 32 on nodes of 16: 16 fits the node and the heads (4 KV heads divide 16)
    cfg = load_train_config(PRESET, ["parallel.context_parallel_size=32",
                                     "parallel.hierarchical_context_parallel_sizes=[16, 2]"])
    assert fitting_a2a_group_size(cfg, 16) == 16 and fitting_a2a_group_size(cfg, 8) == 8
    # TP 4: 8 heads and 1 KV head per TP rank; on nodes of 8, TP x A <= 8 -> A = 2
    tp4 = load_train_config(PRESET, ["parallel.tensor_parallel_size=4"])
    assert fitting_a2a_group_size(tp4, 8) == 2
    # demo with CP 6: the 2 heads allow only A = 2, whatever the node holds
    demo = load_train_config(DEMO, ["parallel.context_parallel_size=6", "parallel.cp_comm_type=a2a+p2p",
                                    "parallel.hierarchical_context_parallel_sizes=[2, 3]"])
    assert fitting_a2a_group_size(demo, 12) == 2


def test_plain_a2a_across_nodes_is_a_warning(capsys, tmp_path):
    a2a = ["parallel.cp_comm_type=a2a", "parallel.hierarchical_context_parallel_sizes=null"]
    code, out, err = _dry_run(capsys, tmp_path, PRESET, 8, 8, *a2a)
    assert code == 0 and "#SBATCH --nodes=8" in out  # still rendered
    assert ("lucid launch: warning: parallel.cp_comm_type='a2a' runs its head all-to-all over all context-parallel "
            "ranks, tensor_parallel_size x context_parallel_size = 1 x 16 = 16 consecutive ranks") in err
    assert ("Consider parallel.cp_comm_type=a2a+p2p with parallel.hierarchical_context_parallel_sizes=[8, 2]"
            in err)
    # inside one node (CP 8 on nodes of 8): nothing to say
    code, _, err = _dry_run(capsys, tmp_path, PRESET, 8, 8, *a2a, "parallel.context_parallel_size=8",
                            "train.global_batch_size=8")
    assert code == 0 and err == "", err


def test_a_world_that_tp_x_cp_does_not_divide_is_refused(capsys, tmp_path):
    code, _, err = _dry_run(capsys, tmp_path, PRESET, 3, 8)
    assert code == 2
    assert ("the world size (24 processes) is not divisible by tensor_parallel_size x context_parallel_size "
            "(1 x 16)") in err
