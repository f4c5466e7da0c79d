"""The exported directory loads with trust_remote_code where lucid_megatron cannot be imported."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lucid_megatron.runtime.commands import NiahOptions, niah_command, process_command

from .conftest import convert

# Runs in a fresh interpreter where lucid_megatron (and megatron/deepspeed, which a machine with only torch +
# transformers + safetensors would not have either) look uninstalled: with None in sys.modules an import fails
# and importlib.util.find_spec answers None (transformers probes for deepspeed when accelerate is installed).
HIDDEN = r"""
import json, sys
HIDDEN = ("lucid_megatron", "megatron", "deepspeed")
sys.modules.update(dict.fromkeys(HIDDEN))
import torch
loaded = {}
exec(sys.argv[3].replace('"out/hf"', repr(sys.argv[1])), loaded)  # loading code naming the directory "out/hf"
model = loaded["model"].eval()
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits
print(json.dumps({"logits": logits.tolist(), "type": type(model).__module__,
                  "fast": model.__class__.__module__ and bool(sys.modules[type(model).__module__]._fast_precondition),
                  "encoded": loaded["tok"]("hi")["input_ids"] if "tok" in loaded else None,
                  "hidden_loaded": [m for m, module in sys.modules.items() if m.split(".")[0] in HIDDEN and module]}))
"""
LOAD = """
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("out/hf", trust_remote_code=True)
"""


def _docs_loading_code() -> str:
    """The Python block of docs/conversion.md that loads an export (model and tokenizer)."""
    text = (Path(__file__).parents[2] / "docs" / "conversion.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _run_hidden(directory, tokens, code, cwd):
    """HIDDEN in a fresh interpreter, stdin closed: a trust_remote_code prompt would show in its output."""
    result = subprocess.run([sys.executable, "-c", HIDDEN, str(directory), json.dumps(tokens.tolist()), code],
                            capture_output=True, text=True, timeout=300, cwd=cwd, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trust_remote_code" not in result.stdout + result.stderr  # no prompt, no warning about it
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_loads_without_lucid_megatron(exported, tmp_path):
    """The documented loading code (docs/conversion.md) works where only torch + transformers exist."""
    tokens = torch.randint(0, 259, (2, 33), generator=torch.Generator().manual_seed(3))
    out = _run_hidden(exported, tokens, _docs_loading_code(), tmp_path)
    assert out["hidden_loaded"] == [] and out["fast"] is False  # the plain-PyTorch solve ran
    assert "modeling_lucid" in out["type"]
    assert out["encoded"] == [256, ord("h"), ord("i")]  # the tokenizer loaded too, <bos> first
    # Same logits as the model loaded here, where the fast operator is available.
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(tokens, use_cache=False).logits
    assert (torch.tensor(out["logits"]) - want).abs().max().item() < 1e-5


def _foreign_directory(exported, tmp_path):
    """A copy of a LUCID export whose config points at code of its own (auto_map) that leaves a marker."""
    foreign = tmp_path / "foreign"
    shutil.copytree(exported, foreign)
    marker = tmp_path / "foreign-code-ran"
    (foreign / "evil_config.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\n\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    config = json.loads((foreign / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_config.EvilConfig"}
    (foreign / "config.json").write_text(json.dumps(config))
    return foreign, marker


def test_no_code_from_a_directory_runs_without_trust_remote_code(run_tp1, exported, tmp_path):
    foreign, marker = _foreign_directory(exported, tmp_path)
    verify = convert("verify", run_tp1, foreign, "--batches", "1", "--seq-len", "16", expect_ok=False)
    niah_arguments = niah_command(NiahOptions(lengths=[256], num_samples=1), hf=[foreign])
    niah = subprocess.run(process_command(niah_arguments), capture_output=True, text=True, timeout=600)
    for result in (verify, niah):
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        assert "trust_remote_code" in result.stderr
    assert not marker.exists()
    # the project's own export needs no remote code: it loads through the registered LUCID classes
    report = convert("verify", run_tp1, exported, "--batches", "1", "--seq-len", "16")
    assert "PASS" in report.stdout


class _RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def test_a_crafted_checkpoint_index_is_refused_before_torch_unpickles_it(run_tp1, tmp_path):
    import pickle

    crafted = tmp_path / "crafted"
    shutil.copytree(run_tp1, crafted)
    marker = tmp_path / "index-code-ran"
    for index in crafted.rglob("model/.metadata"):
        index.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    result = convert("to-hf", crafted, tmp_path / "out", expect_ok=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "names classes outside a checkpoint index (posix.system): refused" in result.stderr
    assert not marker.exists()


def test_import_lucid_megatron_leaves_transformers_alone():
    probe = "import sys, lucid_megatron; print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_save_pretrained_of_a_registered_load_reloads_without_lucid_megatron(exported, tmp_path):
    """Loaded through the registered classes (no remote code), saved again: the copy carries its code."""
    import lucid_megatron.hf  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert type(model).__module__ == "lucid_megatron.hf.modeling_lucid"
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    assert {"configuration_lucid.py", "modeling_lucid.py"} <= {p.name for p in resaved.iterdir()}
    tokens = torch.randint(0, 259, (1, 17), generator=torch.Generator().manual_seed(4))
    out = _run_hidden(resaved, tokens, LOAD, tmp_path)
    with torch.no_grad():
        want = model(tokens, use_cache=False).logits
    assert (torch.tensor(out["logits"]) - want).abs().max().item() < 1e-5
