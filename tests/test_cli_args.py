"""Arguments are validated before any work: bounds by argparse (exit 2, one line), layouts before torchrun
starts, memory before anything is generated, outputs before anything is computed (docs/cli.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lucid_megatron import cli_args, memory_estimate
from lucid_megatron.cli import main

# A checkpoint as eval and convert read it before loading anything: COMPLETE and model.yaml (4 heads).
MODEL_YAML = """num_layers: 2
hidden_size: 64
num_attention_heads: 4
num_kv_heads: 4
ffn_hidden_size: 192
vocab_size: 259
"""


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "step_00000001"
    path.mkdir()
    (path / "COMPLETE").write_text("")
    (path / "model.yaml").write_text(MODEL_YAML)
    return path


@pytest.fixture
def no_torchrun(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torchrun started")

    monkeypatch.setattr("lucid_megatron.runtime.torchrun.run_torchrun", refuse)


def lucid(capsys, *argv) -> tuple[int, str]:
    code = main([str(word) for word in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "niah", "--checkpoint", "c", "--lengths", "64", "--num-samples", "0"],
     "lucid eval niah: error: argument --num-samples: 0 is not allowed; allowed: 1 <= n <= 1000000"),
    (["eval", "niah", "--checkpoint", "c", "--lengths", "64", "--batch-size", "0"],
     "argument --batch-size: 0 is not allowed; allowed: 1 <= n <= 4096"),
    (["eval", "ppl", "--checkpoint", "c", "--data", "d", "--bucket-size", "0"], "argument --bucket-size: 0 is not"),
    (["convert", "verify", "c", "h", "--seq-len", "0"], "argument --seq-len: 0 is not allowed"),
    (["convert", "verify", "c", "h", "--batches", "-3"], "argument --batches: -3 is not allowed"),
    (["convert", "verify", "c", "h", "--max-kl", "nan"], "argument --max-kl: nan is not allowed; allowed: 0 <= x"),
    (["data", "synth", "out", "--max-len", "100000000"], f"allowed: 1 <= n <= {cli_args.MAX_TOKENS}"),
    (["data", "prepare", "a.txt", "--out", "o", "--valid-fraction", "1"], "allowed: 0 <= x < 1"),
    (["experiment", "toy", "--out", "o", "--seeds", "-1"], f"allowed: 0 <= n <= {2**32 - 1}"),
    (["train", "demo", "--nproc-per-node", "0"], "argument --nproc-per-node: 0 is not allowed"),
    (["launch", "slurm", "demo", "--signal-seconds", "70000"], "allowed: 1 <= n <= 65535"),
    (["demo", "--seqlen", "ten"], "argument --seqlen: 'ten' is not allowed; allowed: an integer"),
    (["convert", "to-hf", "c", "o", "--max-shard-size", "5XB"], "argument --max-shard-size: '5XB' is not allowed"),
])
def test_bad_numbers_are_refused_by_argparse(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, err = lucid(capsys, *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_the_console_script_exits_2_on_a_bad_argument(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lucid_megatron", "eval", "niah", "--checkpoint", "c",
                             "--lengths", "64", "--num-samples", "0"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and "argument --num-samples: 0 is not allowed" in result.stderr


def test_an_absurd_length_is_refused_by_the_memory_estimate_at_once(capsys, tmp_path, checkpoint, no_torchrun):
    argv = ("eval", "niah", "--checkpoint", checkpoint, "--lengths", "10000000", "--out", tmp_path / "r.json")
    lucid(capsys, *argv)  # the first call imports the command's modules; the check itself is timed below
    started = time.monotonic()
    code, err = lucid(capsys, *argv)
    seconds = time.monotonic() - started
    assert code == 2 and seconds < 0.5, (seconds, err)
    assert "lucid eval: error: lucid eval niah with 8 x 10000000 tokens per forward pass needs at least" in err
    assert "documents" in err and "available on this machine" in err and "--ignore-memory-check" in err
    assert err.count("\n") == 1 and not (tmp_path / "r.json").exists()


def test_the_memory_check_can_be_overridden(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda: 1 << 20)
    monkeypatch.setattr("lucid_megatron.data.synth.write_synth_dataset", lambda *a, **k: "written")
    monkeypatch.setattr("lucid_megatron.data.cli._report", lambda manifest: print(manifest))
    code, err = lucid(capsys, "data", "synth", tmp_path / "d", "--min-len", 1000, "--max-len", 100000)
    assert code == 2 and "lucid data synth with --max-len 100000 needs at least 4.3 MiB" in err, err
    assert "more than the 1.0 MiB available" in err
    code, err = lucid(capsys, "data", "synth", tmp_path / "d", "--min-len", 1000, "--max-len", 100000,
                      "--ignore-memory-check")
    assert code == 0, err


def test_the_estimate_adds_its_parts():
    shape = memory_estimate.ModelShape(layers=2, hidden=64, ffn=192, vocab=384, heads=4, kv_heads=4, head_dim=16,
                                       tied=False)
    assert shape.parameters == 2 * 384 * 64 + 2 * (64 * 16 * 16 + 3 * 64 * 192)
    forward = memory_estimate.forward_bytes(shape, rows=2, length=100, context_parallel=2)
    assert forward == {"activations": 100 * (4 * 64 + 2 * 192) * 4, "logits": 100 * 384 * 4 * 3}
    estimate = memory_estimate.MemoryEstimate({"a": 3 << 30, "b": 1 << 30}, processes=2)
    assert estimate.total == 8 << 30 and estimate.describe() == "a 3.0 GiB + b 1.0 GiB x 2 processes = 8.0 GiB"
    with pytest.raises(memory_estimate.InsufficientMemory, match=r"needs at least 8.0 GiB .* the 7.0 GiB available"):
        memory_estimate.check_fits(estimate, what="this", available=7 << 30)
    memory_estimate.check_fits(estimate, what="this", available=8 << 30)


def test_a_tensor_parallel_size_the_heads_do_not_divide_is_refused_before_torchrun(capsys, checkpoint, no_torchrun):
    code, err = lucid(capsys, "eval", "niah", "--checkpoint", checkpoint, "--lengths", "64",
                      "--tensor-parallel-size", "3")
    assert code == 2 and err.count("\n") == 1, err
    assert "num_attention_heads (4) is not divisible by tensor_parallel_size (3)" in err
    code, err = lucid(capsys, "eval", "ppl", "--checkpoint", checkpoint, "--data", checkpoint,
                      "--context-parallel-size", "3", "--cp-comm-type", "a2a")
    assert code == 2 and "context_parallel_size (3)" in err, err


def test_context_parallel_needs_two_chunks_per_rank(capsys, checkpoint, no_torchrun):
    code, err = lucid(capsys, "eval", "ppl", "--checkpoint", checkpoint, "--data", checkpoint, "--seq-length", "6",
                      "--context-parallel-size", "4")
    assert code == 2 and "--seq-length [6] is shorter than 2 x --context-parallel-size = 8" in err, err


def test_hugging_face_models_are_refused_with_a_parallel_layout_before_torchrun(capsys, tmp_path, no_torchrun):
    code, err = lucid(capsys, "eval", "niah", "--hf", tmp_path, "--lengths", "64", "--context-parallel-size", "2")
    assert code == 2 and "evaluated in one process" in err, err


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_outputs_that_cannot_be_written_are_refused_up_front(capsys, tmp_path, checkpoint, option, no_torchrun):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, what in ((tmp_path, "is a directory"), (fifo, "is a FIFO"), (checkpoint / "COMPLETE" / "x", "")):
        code, err = lucid(capsys, "eval", "niah", "--checkpoint", checkpoint, "--lengths", "64", option, bad)
        assert code == 2 and what in err and str(bad) in err, err
        assert err.strip().splitlines()[-1].startswith(("lucid eval", "lucid eval niah")), err


def test_output_directories_are_checked_before_work(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err = lucid(capsys, "experiment", "toy", "--out", tmp_path / "file")
    assert code == 2 and "is a regular file; expected a directory" in err, err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code, err = lucid(capsys, "data", "synth", busy)
    assert code == 2 and "exists and is not empty" in err, err


def test_prepare_names_inputs_that_are_not_regular_files(capsys, tmp_path):
    from lucid_megatron.data.readers import InputError, expand_inputs

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a document")
    os.mkfifo(corpus / "b.txt")
    with pytest.raises(InputError, match=r"b.txt' is a FIFO, not a regular file"):
        expand_inputs([corpus])
    with pytest.raises(InputError, match=r"is a FIFO, not a regular file"):
        expand_inputs([corpus / "b.txt"])
    code, err = lucid(capsys, "data", "prepare", corpus, "--out", tmp_path / "out")
    assert code == 2 and "is a FIFO, not a regular file" in err, err
    code, err = lucid(capsys, "data", "prepare", corpus / "b.txt", "--out", tmp_path / "out")
    assert code == 2 and "is a FIFO; expected a regular file or a directory" in err, err


@pytest.mark.parametrize("time_limit,problem", [
    ("99:99:99", "minutes 99 must be < 60"), ("10:75", "seconds 75 must be < 60"), ("2-24", "hours 24 must be < 24"),
    ("1-2:3:4:5", "not one of its forms"), ("two hours", "not one of its forms"),
])
def test_slurm_times_out_of_range_are_refused(capsys, tmp_path, time_limit, problem):
    code, err = lucid(capsys, "launch", "slurm", "demo", "--time", time_limit, "--run-dir", tmp_path / "r",
                      "--dry-run")
    assert code == 2 and f"--time {time_limit!r} is not a SLURM time: {problem}" in err, err


@pytest.mark.parametrize("time_limit", ["90", "90:30", "48:00:00", "1-12", "1-12:30", "1-12:30:59", "0"])
def test_every_slurm_time_form_is_accepted(time_limit):
    from lucid_megatron.launch.slurm import slurm_time_problem

    assert slurm_time_problem(time_limit) is None


def test_missing_slurm_tools_are_one_line_failures(capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no SLURM client can be found, installed or not
    code, err = lucid(capsys, "launch", "status", "123")
    assert code == 1 and err == ("lucid launch: error: squeue not found: run this on a machine with the SLURM "
                                 "client tools\n")


def test_exit_codes_tell_bad_input_from_failures():
    assert cli_args.exit_code(ValueError("bad")) == cli_args.exit_code(FileNotFoundError("x")) == 2
    assert cli_args.exit_code(OSError(28, "No space left on device")) == 1
    assert cli_args.exit_code(RuntimeError("worker died")) == 1


def test_help_exits_0(capsys):
    assert main(["eval", "niah", "--help"]) == 0
    assert "--ignore-memory-check" in capsys.readouterr().out
