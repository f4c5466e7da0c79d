"""Checkpoints, datasets, tokenizers and Hugging Face directories that do not belong together are refused up front,
in one line naming both sides (exit 2, no traceback)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
from lucid_megatron.data.tokenizer import HFTokenizer
from tests.data.common import build_hf_tokenizer


def lucid(*args):
    return subprocess.run([sys.executable, "-m", "lucid_megatron", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def refusal(result) -> str:
    """The one error line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A small BPE: its own vocabulary size, and bos = eos = pad (it defines only an eos token)."""
    return build_hf_tokenizer(tmp_path_factory.mktemp("tok") / "tiny-bpe")


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory, other_tokenizer):
    dataset = tmp_path_factory.mktemp("bpe-data") / "synth"
    write_synth_dataset(dataset, RetrievalTask(min_len=40, max_len=64, num_needles=1, num_queries=1), train_docs=8,
                        valid_docs=8, docs_per_shard=8, seed=0, tokenizer=HFTokenizer(other_tokenizer))
    return dataset


@pytest.fixture()
def step_copy(run_tp1, tmp_path):
    """A copy of the run's last checkpoint, to break."""
    copy = tmp_path / "step"
    shutil.copytree(next((run_tp1 / "checkpoints").glob("step_*")), copy)
    return copy


def test_eval_ppl_refuses_a_dataset_made_with_another_tokenizer(run_tp1, other_dataset):
    line = refusal(lucid("eval", "ppl", "--checkpoint", run_tp1, "--data", other_dataset, "--seq-length", 64,
                         "--rows", 2, "--batch-size", 2))
    assert "tokenizers differ (kind byte vs hf, name byte-v1 vs hf:tiny-bpe, vocabulary 259 vs" in line
    assert "was trained with byte-v1 (vocabulary 259, bos 256, eos 257, pad 258)" in line
    assert f"the dataset {other_dataset} was made with hf:tiny-bpe (vocabulary" in line


def test_ppl_tokenizer_check_notes_checkpoints_without_a_record(other_dataset, tmp_path):
    from lucid_megatron.data.shards import read_manifest
    from lucid_megatron.eval import ppl

    old = tmp_path / "old"
    old.mkdir()
    (old / "COMPLETE").write_text("")
    (old / "state.json").write_text(json.dumps({"step": 3}))
    note = ppl.check_tokenizer(old, other_dataset, read_manifest(other_dataset))
    assert note == (f"{old}/state.json does not record the tokenizer it was trained with (an older checkpoint); "
                    "not checked against the dataset's hf:tiny-bpe")


def test_to_hf_refuses_another_tokenizer_before_writing(run_tp1, other_tokenizer, tmp_path):
    out = tmp_path / "hf"
    line = refusal(lucid("convert", "to-hf", run_tp1, out, "--tokenizer", other_tokenizer))
    assert "the checkpoint was trained with byte-v1 (vocabulary 259, bos 256, eos 257, pad 258)" in line
    assert f"--tokenizer {other_tokenizer} is hf:tiny-bpe (vocabulary" in line
    assert not out.exists() and not list(tmp_path.glob("hf*"))


def test_export_tokenizer_without_a_record_is_taken_with_a_note(other_tokenizer, capsys):
    from lucid_megatron.convert.cli import _tokenizer_for_export

    assert _tokenizer_for_export("byte", {"tokenizer": {"kind": "byte", "name": "byte-v1", "vocab_size": 259,
                                                        "bos_id": 256, "eos_id": 257, "pad_id": 258,
                                                        "path": None}}).name == "byte-v1"
    assert _tokenizer_for_export(str(other_tokenizer), {"step": 3}).name == "hf:tiny-bpe"
    assert "does not record the tokenizer it was trained with" in capsys.readouterr().err


def test_hf_directory_without_weights(run_tp1, exported, tmp_path):
    empty = tmp_path / "no-weights"
    shutil.copytree(exported, empty, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    expected = f"{empty} has no model weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin"
    assert expected in refusal(lucid("eval", "niah", "--checkpoint", run_tp1, "--hf", empty, "--lengths", 256,
                                     "--num-samples", 1))
    assert expected in refusal(lucid("convert", "verify", run_tp1, empty))
    assert "no model.safetensors or model.safetensors.index.json" in refusal(lucid("convert", "from-hf", empty,
                                                                                  tmp_path / "ckpt"))


def test_model_yaml_that_does_not_match_the_weights(step_copy, train_config, tmp_path):
    model = yaml.safe_load((step_copy / "model.yaml").read_text())
    model["ffn_hidden_size"] = 2 * model["ffn_hidden_size"]
    (step_copy / "model.yaml").write_text(yaml.safe_dump(model))
    expected = (f"{step_copy}: model.yaml does not match the weights: tensor 'decoder.layers.mlp.linear_fc1.weight' "
                f"is (2, {model['ffn_hidden_size']}, 64) in the checkpoint but (2, {2 * model['ffn_hidden_size']}, 64) "
                "in the model model.yaml describes")
    assert expected in refusal(lucid("convert", "to-hf", step_copy, tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert expected in refusal(lucid("eval", "ppl", "--checkpoint", step_copy, "--data", train_config.parent / "synth",
                                     "--seq-length", 64, "--rows", 2, "--batch-size", 2))


def test_load_errors_of_torch_and_of_unknown_kinds_are_one_line():
    from torch.distributed.checkpoint.api import CheckpointException

    from lucid_megatron.checkpoint.load_errors import describe_load_error

    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.Linear(2, 3).load_state_dict({"weight": torch.zeros(4, 2), "bias": torch.zeros(3)})
    assert describe_load_error(torch_error.value, "C") == (
        "C: model.yaml does not match the weights: tensor 'weight' is (4, 2) in the checkpoint but (3, 2) in the "
        "model model.yaml describes")
    wrapped = CheckpointException("load failed", {0: (OSError("model/__0_0.distcp: short read\nmore"), None)})
    assert describe_load_error(wrapped, "C") == "C: the weights do not load: OSError: model/__0_0.distcp: short read"


def test_verify_names_a_tensor_of_the_wrong_shape(run_tp1, exported, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    weights = load_file(str(hf / "model.safetensors"))
    weights["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    line = refusal(lucid("convert", "verify", run_tp1, hf))
    assert (f"{hf / 'model.safetensors'}: tensor 'model.layers.0.self_attn.k_proj.weight' has shape (3, 64), "
            "expected (32, 64) (from config.json)") in line
