"""The lm-eval-harness command of docs/conversion.md, run as written on an export, offline, with a local task
(configs/lm_eval): its accuracy and every loglikelihood equal the Hugging Face model's own."""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lm-eval]')")

ROOT = Path(__file__).parents[2]
TASK_DIR = ROOT / "configs" / "lm_eval"
DIGITS = [str(d) for d in range(10)]  # the task's choices
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _documented_command() -> list[str]:
    """The lm_eval command of docs/conversion.md's lm-eval section, as argv."""
    text = (ROOT / "docs" / "conversion.md").read_text()
    section = text.split("## Evaluating with lm-eval-harness", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def _direct_loglikelihoods(model_dir, items) -> torch.Tensor:
    """[items, 10] log-probabilities of each digit after each item's context, from the model itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    digits = [tok(d, add_special_tokens=False)["input_ids"] for d in DIGITS]
    assert all(len(ids) == 1 for ids in digits)  # one token each: the next-token distribution scores them
    rows = []
    with torch.no_grad():
        for item in items:
            ids = torch.tensor([tok(item["context"])["input_ids"]])  # <bos> first, as lm-eval encodes it
            logits = model(ids, use_cache=False, float32_logits=True).logits[0, -1]
            rows.append(logits.double().log_softmax(-1)[[d[0] for d in digits]])
    return torch.stack(rows)


def test_documented_lm_eval_command_reports_the_models_own_accuracy(exported, tmp_path):
    argv = _documented_command()
    assert argv[0] == "lm_eval" and "--include_path" in argv and "--log_samples" in argv
    paths = {"out/hf": str(exported), "configs/lm_eval": str(TASK_DIR), "out/lm-eval": str(tmp_path / "out")}
    for old, new in paths.items():
        argv = [arg.replace(old, new) for arg in argv]
    executable = Path(sys.executable).with_name("lm_eval")
    argv[0] = str(executable) if executable.exists() else shutil.which("lm_eval")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    # a world of one: a LOCAL_RANK left by an in-process Megatron run would make accelerate start torch.distributed
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, env=dict(env, **offline))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    items = [json.loads(line) for line in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    results = json.loads(Path(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read_text())
    samples = [json.loads(line) for line in
               Path(glob.glob(str(tmp_path / "out" / "*" / "samples_lucid_key_update_*.jsonl"))[0]).read_text().splitlines()]
    reported = results["results"]["lucid_key_update"]
    assert reported["sample_len"] == len(items) == 40

    want = _direct_loglikelihoods(exported, items)
    got = torch.zeros_like(want)
    for sample in samples:
        assert sample["doc"] == items[sample["doc_id"]]
        got[sample["doc_id"]] = torch.tensor([float(r[0][0]) for r in sample["resps"]], dtype=torch.float64)
    # lm-eval batches 8 right-padded contexts, here one context at a time: fp32 rounding (observed 2e-6)
    assert (got - want).abs().max().item() < 1e-5
    top2 = want.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4  # no near-ties: the argmax cannot flip by rounding
    accuracy = (want.argmax(-1) == torch.tensor([item["answer"] for item in items])).double().mean().item()
    assert reported["acc,none"] == accuracy
    # and the table it prints shows that number (4 decimals)
    row = next(line for line in result.stdout.splitlines() if line.startswith("|lucid_key_update|"))
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    assert cells[4] == "acc" and float(cells[6]) == pytest.approx(accuracy, abs=5e-5), row
