"""``lucid eval scalars RUN_DIR``: a training run's TensorBoard scalars in one PNG.

The event files under ``RUN_DIR/tensorboard`` (written while ``logging.tensorboard`` is on, the default) are
read back with TensorBoard's own reader and drawn as a grid of panels, much like TensorBoard's scalar
dashboard, each titled with the tags it shows.  Panels whose tags a run did not log are left out (older runs,
CPU runs without ``perf/mfu``, runs without a mixture).  docs/training.md ("Reading a run") says what each
number means.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from lucid_megatron import atomic

Series = list[tuple[int, float]]

EVENT_FILE_GLOB = "events.out.tfevents.*"
TIME_TAGS = ("perf/time/data_wait_s", "perf/time/compute_s", "perf/time/optimizer_s", "perf/time/checkpoint_s",
             "perf/time/evaluation_s")
COLLECTIVE_WAIT_TAG = "perf/time/collective_wait_s"  # inside the sections above: a line over the stack
SHARE_PREFIX = "data/share/"
COLUMNS = 3


@dataclasses.dataclass(frozen=True)
class Panel:
    """One plot: ``tags`` drawn as lines (``stacked``: as a stacked area), ``twin`` on a second y axis."""

    tags: tuple[str, ...]
    ylabel: str
    title: str | None = None  # default: the tags
    twin: tuple[str, ...] = ()
    twin_label: str = ""
    stacked: bool = False


PANELS = (
    Panel(("train/loss", "valid/loss"), "cross entropy (nats/token)"),
    Panel(("train/lr",), "learning rate"),
    Panel(("train/grad_norm",), "gradient norm (before clipping)"),
    Panel(("perf/tokens_per_s_per_gpu",), "tokens/s per GPU"),
    Panel(("perf/tflops_per_gpu", "perf/hardware_tflops_per_gpu"), "TFLOP/s per GPU", twin=("perf/mfu",),
          twin_label="MFU"),
    Panel(TIME_TAGS, "seconds per step", title="perf/time/*: where the median rank's step time goes",
          stacked=True),
    Panel(("perf/rank_time/slowest_s", "perf/rank_time/median_s"), "own seconds per step"),
    Panel(("perf/memory_gib",), "GiB (peak CUDA allocated; RSS on CPU)"),
)


# ------------------------------------------------------------------------------------------ reading


def event_dir(run_dir) -> Path:
    """``RUN_DIR/tensorboard`` after checking that it holds event files (FileNotFoundError naming the path)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist or is not a directory")
    events = run_dir / "tensorboard"
    if not events.is_dir() or not any(path.is_file() for path in events.glob(EVENT_FILE_GLOB)):
        raise FileNotFoundError(
            f"{str(events)!r} holds no TensorBoard event files ({EVENT_FILE_GLOB}); the run must be trained with "
            "logging.tensorboard on (the default) for its scalars to be drawn")
    return events


def read_scalars(run_dir) -> dict[str, Series]:
    """Every scalar tag of the run: tag -> [(step, value)] in step order (a step logged twice, e.g. across a
    restart, keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = event_dir(run_dir)
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0: every point, no sampling
    accumulator.Reload()
    series = {}
    for tag in accumulator.Tags().get("scalars", []):
        by_step = {event.step: float(event.value) for event in accumulator.Scalars(tag)}
        series[tag] = sorted(by_step.items())
    return series


# ------------------------------------------------------------------------------------------ drawing


def panels_for(tags) -> list[Panel]:
    """The panels with at least one of their tags present, in dashboard order; a mixture's shares last."""
    present = set(tags)
    chosen = [panel for panel in PANELS if present.intersection(panel.tags)]
    shares = tuple(sorted(tag for tag in present if tag.startswith(SHARE_PREFIX)))
    if shares:
        chosen.append(Panel(shares, "share of the tokens so far", title=f"{SHARE_PREFIX}*"))
    return chosen


def _drawn_tags(panel: Panel, series: dict[str, Series]) -> list[str]:
    extra = (COLLECTIVE_WAIT_TAG,) if panel.stacked else ()
    return [tag for tag in panel.tags + panel.twin + extra if tag in series]


def _label(tag: str, panel: Panel) -> str:
    return tag.removeprefix(SHARE_PREFIX) if panel.tags[0].startswith(SHARE_PREFIX) else tag


def _draw_stack(ax, panel: Panel, series: dict[str, Series]) -> None:
    tags = [tag for tag in panel.tags if tag in series]
    steps = sorted({step for tag in tags for step, _ in series[tag]})
    by_step = [dict(series[tag]) for tag in tags]
    values = [[points.get(step, 0.0) for step in steps] for points in by_step]  # a step one tag lacks: 0
    labels = [tag.removeprefix("perf/time/").removesuffix("_s") for tag in tags]
    ax.stackplot(steps, values, labels=labels, alpha=0.8)
    if COLLECTIVE_WAIT_TAG in series:
        points = series[COLLECTIVE_WAIT_TAG]
        ax.plot([s for s, _ in points], [v for _, v in points], color="black", linestyle="--", linewidth=1,
                label="collective_wait (inside the above)")


def _draw_lines(ax, tags, panel: Panel, series: dict[str, Series], *, style: str = "-") -> list:
    handles = []
    for tag in tags:
        if tag not in series:
            continue
        points = series[tag]
        marker = "o" if len(points) <= 30 else None  # sparse series (validation) show their points
        handles += ax.plot([s for s, _ in points], [v for _, v in points], style, marker=marker, markersize=3,
                           linewidth=1.2, label=_label(tag, panel))
    return handles


def _draw_panel(ax, panel: Panel, series: dict[str, Series]) -> None:
    top = ax  # the legend goes on the axes drawn last, above every line
    if panel.stacked:
        _draw_stack(ax, panel, series)
        handles, labels = ax.get_legend_handles_labels()
    else:
        handles = _draw_lines(ax, panel.tags, panel, series)
        if any(tag in series for tag in panel.twin):
            top = ax.twinx()
            top.set_prop_cycle(color=["tab:red", "tab:purple"])
            handles += _draw_lines(top, panel.twin, panel, series, style=":")
            top.set_ylabel(panel.twin_label)
        labels = [handle.get_label() for handle in handles]
    ax.set_title(panel.title or ", ".join(tag for tag in panel.tags + panel.twin if tag in series))
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(handles) > 1:
        top.legend(handles, labels, loc="best", fontsize=7)


def plot_scalars(run_dir, out) -> dict[str, Series]:
    """Draw ``RUN_DIR``'s TensorBoard scalars into the PNG ``out`` (written atomically); returns the series
    drawn, tag -> [(step, value)].  FileNotFoundError without event files, ValueError when none of the tags
    this draws were logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(run_dir)
    panels = panels_for(series)
    if not panels:
        known = sorted({tag for panel in PANELS for tag in panel.tags})
        raise ValueError(f"{str(event_dir(run_dir))!r} logs none of the scalars this command draws "
                         f"({', '.join(known)} or {SHARE_PREFIX}*)")
    drawn = {tag: series[tag] for panel in panels for tag in _drawn_tags(panel, series)}
    rows = math.ceil(len(panels) / COLUMNS)
    with matplotlib.rc_context({"font.size": 8, "axes.titlesize": 9}):
        fig, axes = plt.subplots(rows, COLUMNS, figsize=(4.6 * COLUMNS, 3.1 * rows), squeeze=False)
        try:
            for ax, panel in zip(axes.flat, panels):
                _draw_panel(ax, panel, series)
            for ax in list(axes.flat)[len(panels):]:
                ax.set_visible(False)
            fig.suptitle(f"{run_dir}: TensorBoard scalars", fontsize=10)
            fig.tight_layout()
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_figure(out, fig, dpi=90)
        finally:
            plt.close(fig)
    return drawn


def count_panels(series: dict[str, Series]) -> int:
    """How many panels ``plot_scalars`` draws for these series."""
    return len(panels_for(series))
