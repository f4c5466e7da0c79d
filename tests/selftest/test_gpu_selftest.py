"""`lucid selftest gpu --cpu-smoke`: every part of the GPU acceptance run, at toy sizes on CPU."""

import json

from tests import background


def test_cpu_smoke_runs_every_part():
    # `lucid selftest gpu --out DIR --cpu-smoke`, started with the session in the background (tests/background.py)
    out = background.job("selftest").result() / "selftest"
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert [parts[p]["status"] for p in ("kernels", "training", "resume", "hf", "timings")] == ["PASS"] * 5

    kernels = parts["kernels"]["cases"]
    assert kernels and all(c["out"] < 1e-4 and c["dk"] < 1e-4 and c["dv"] < 1e-4 for c in kernels)
    runs = parts["training"]["runs"]
    reference, bf16 = runs["fp32-cpu"]["losses"], runs["bf16-local"]["losses"]
    assert len(reference) == len(bf16) == 4
    assert 0 < runs["bf16-local"]["max_rel_diff_vs_reference"] < 5e-3
    assert runs["bf16-te"]["status"] == "SKIPPED" and "Transformer Engine" in runs["bf16-te"]["reason"]
    assert parts["resume"]["bit_identical"]  # CPU kernels are deterministic
    assert parts["hf"]["max_kl"] < 1e-9 and parts["hf"]["top1_agreement"] == 1.0
    timings = parts["timings"]
    assert timings["preconditioner"] and timings["models"][0]["lucid_ms"] > 0
    table = (out / "results.md").read_text()
    assert "overall: PASS" in table and "## e2. model step" in table
