"""The selftest's report: every part listed in gpu.py's docstring, one status type, failures say why."""

import json

from lucid_megatron.selftest import gpu
from lucid_megatron.selftest.parts.base import Context, Part, Result, Status


def test_the_docstring_lists_every_part_in_the_order_they_run():
    listed = [line.split()[0] for line in gpu.__doc__.splitlines() if line and not line[0].isspace()]
    names = [part.name for part in gpu.PARTS]
    assert [word for word in listed if word in names] == names


def test_a_part_that_raises_fails_with_the_error_and_the_report_says_so(tmp_path):
    def broken(ctx):
        raise ValueError("no device")

    ctx = Context(out=tmp_path, device=None, cpu_smoke=True, started=0.0, budget_s=1.0)
    result = Part("broken", "raises", broken).run(ctx)
    assert result == Result(status=Status.FAIL, reason="ValueError: no device")
    report = gpu.Report(tmp_path, {"date": "today", "mode": "cpu-smoke", "device": "CPU", "torch": "x",
                                   "triton": None})
    report.record("skipped", Result(status=Status.SKIPPED, reason="not here"))
    report.record("broken", result)
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts == {"skipped": {"status": "SKIPPED", "reason": "not here"},
                     "broken": {"status": "FAIL", "reason": "ValueError: no device"}}
    table = (tmp_path / "results.md").read_text()
    assert "## broken: FAIL (ValueError: no device)" in table and "## skipped: SKIPPED (not here)" in table
    assert table.endswith("overall: FAIL (broken)\n")
