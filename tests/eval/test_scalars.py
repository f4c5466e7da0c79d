"""``lucid eval scalars``: a real run's TensorBoard event files drawn into one PNG, the series drawn equal to
what metrics.jsonl logged, and a run without event files refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lucid_megatron.cli import main
from lucid_megatron.eval.scalars import plot_scalars
from tests.train.runs import metrics, run_train, small_training_config, train_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scalars")
    config = small_training_config(root, train_docs=200, valid_docs=20)
    run = root / "run"
    run_train(config, run, overrides=[f"train.steps={STEPS}", "logging.interval=1", "logging.eval_interval=3"])
    return run


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:len(PNG_SIGNATURE)] == PNG_SIGNATURE


def test_the_command_draws_a_png_where_asked_and_by_default(run_dir, tmp_path, capsys):
    out = tmp_path / "pictures" / "run.png"
    assert main(["eval", "scalars", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0] and "panels" in printed[0], printed
    assert _is_png(out)
    assert not [p for p in out.parent.iterdir() if p.name != out.name], "a staging file was left behind"

    assert main(["eval", "scalars", str(run_dir)]) == 0
    assert _is_png(run_dir / "scalars.png")


def test_the_series_drawn_are_the_ones_logged(run_dir, tmp_path):
    drawn = plot_scalars(run_dir, tmp_path / "scalars.png")
    records = train_records(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1))

    def logged(key: str) -> list[tuple[int, float]]:
        return [(step, records[step][key]) for step in sorted(records)]

    # TensorBoard stores float32: equal within its rounding
    for tag, key in (("train/loss", "loss"), ("perf/time/compute_s", "time/compute_s"), ("train/lr", "lr"),
                     ("perf/tokens_per_s_per_gpu", "tokens_per_s_per_gpu")):
        assert [step for step, _ in drawn[tag]] == [step for step, _ in logged(key)], tag
        assert [value for _, value in drawn[tag]] == pytest.approx([value for _, value in logged(key)], rel=1e-6), tag

    valid = [(r["step"], r["valid_loss"]) for r in metrics(run_dir) if "valid_loss" in r]
    assert [step for step, _ in valid] == [3, 6]
    assert [step for step, _ in drawn["valid/loss"]] == [3, 6]
    assert [v for _, v in drawn["valid/loss"]] == pytest.approx([v for _, v in valid], rel=1e-6)

    # a tag the run never logged has no panel: ZeRO-0 logs grad_norm as null, CPU runs no MFU, no mixture
    assert all(records[step]["grad_norm"] is None for step in records)
    assert "train/grad_norm" not in drawn
    assert "perf/mfu" not in drawn
    assert not [tag for tag in drawn if tag.startswith("data/share/")]


def test_mfu_and_a_mixtures_shares_are_drawn_when_logged(tmp_path):
    """Tags a CPU run without a mixture never logs, written as a GPU mixture run would (torch's SummaryWriter,
    as training does): MFU on the throughput panel's twin axis, one panel for the shares."""
    from torch.utils.tensorboard import SummaryWriter

    from lucid_megatron.eval.scalars import count_panels

    run = tmp_path / "run"
    writer = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step in range(1, 5):
        for tag, value in (("train/loss", 3.0 / step), ("perf/tflops_per_gpu", 400.0),
                           ("perf/hardware_tflops_per_gpu", 450.0), ("perf/mfu", 0.4 + step / 100),
                           ("data/share/web", 0.6), ("data/share/code", 0.4)):
            writer.add_scalar(tag, value, step)
    writer.close()
    drawn = plot_scalars(run, tmp_path / "mix.png")
    assert _is_png(tmp_path / "mix.png")
    assert count_panels(drawn) == 3  # loss, throughput (+ MFU), shares
    assert [v for _, v in drawn["perf/mfu"]] == pytest.approx([0.41, 0.42, 0.43, 0.44], rel=1e-6)
    assert {"data/share/web", "data/share/code"} <= set(drawn)


@pytest.mark.parametrize("layout", ["no tensorboard directory", "an empty tensorboard directory"])
def test_a_run_without_event_files_is_refused_in_one_line(layout, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if layout == "an empty tensorboard directory":
        (run / "tensorboard").mkdir()
    assert main(["eval", "scalars", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lucid eval: error: ")
    assert str(run / "tensorboard") in err[0] and "logging.tensorboard" in err[0]
    assert not (run / "scalars.png").exists()


def test_a_missing_run_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["eval", "scalars", str(missing), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0], err
