"""The exported directory loads with trust_remote_code where lucid_megatron cannot be imported."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

# Runs in a fresh interpreter whose import system refuses lucid_megatron (and megatron/deepspeed, which a
# machine with only torch + transformers + safetensors would not have either).
HIDDEN = r"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lucid_megatron", "megatron", "deepspeed"):
            raise ImportError(f"{name} is hidden for this test")
        return None
sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits
print(json.dumps({"logits": logits.tolist(), "type": type(model).__module__,
                  "fast": model.__class__.__module__ and bool(sys.modules[type(model).__module__]._fast_precondition),
                  "hidden_loaded": [m for m in sys.modules if m.split(".")[0] in ("lucid_megatron", "megatron")]}))
"""


def test_loads_without_lucid_megatron(exported, tmp_path):
    tokens = torch.randint(0, 259, (2, 33), generator=torch.Generator().manual_seed(3))
    result = subprocess.run([sys.executable, "-c", HIDDEN, str(exported), json.dumps(tokens.tolist())],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["hidden_loaded"] == [] and out["fast"] is False  # the plain-PyTorch solve ran
    assert "modeling_lucid" in out["type"]
    # Same logits as the model loaded here, where the fast operator is available.
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(tokens, use_cache=False).logits
    assert (torch.tensor(out["logits"]) - want).abs().max().item() < 1e-5
