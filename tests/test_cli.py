"""The `lucid` console script and `python -m lucid_megatron` are the same command."""

import re
import subprocess
import sys


def test_console_script_lists_subcommands():
    out = subprocess.run(["lucid", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out


def test_module_entry_point_runs_demo():
    result = subprocess.run(
        [sys.executable, "-m", "lucid_megatron", "demo", "--seqlen", "256"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    errors = [float(x) for x in re.findall(r"(?:prefill|token-by-token)\s+([0-9.e+-]+)", result.stdout)]
    assert len(errors) == 2 and max(errors) < 1e-12, result.stdout
    assert re.search(r"LUCID blockwise\s+[0-9.]+ ms", result.stdout)


def test_unknown_subcommand_is_refused():
    result = subprocess.run([sys.executable, "-m", "lucid_megatron", "bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'bogus'" in result.stderr
