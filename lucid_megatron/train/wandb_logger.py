"""Weights & Biases beside TensorBoard (``logging.wandb``; the ``wandb`` extra): rank 0 sends the scalars
TensorBoard gets, under the same tags, to one W&B run per run directory.

The W&B run's id is kept in ``RUN_DIR/wandb/run_id``, so a resumed training run continues the same W&B run
(``resume="allow"``); W&B keeps its own files (offline runs, logs) beside it, in ``RUN_DIR/wandb/``.
"""

from __future__ import annotations

import re
import secrets
import string
from pathlib import Path

from lucid_megatron.atomic import write_text as atomic_write_text
from lucid_megatron.config.schema import ConfigError, to_dict

from .metrics import tensorboard_tag

NOT_INSTALLED = "logging.wandb: the wandb package is not installed; pip install 'lucid-megatron[wandb]'"
RUN_ID = re.compile(r"[a-z0-9]{1,64}")  # what W&B accepts in a run's id (and in its URL)


def check_wandb_available(cfg) -> None:
    """Refuse (ConfigError) a config that asks for W&B where the package does not import; runs before any
    process group exists."""
    if cfg.logging.wandb is None:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(NOT_INSTALLED) from None


def stable_run_id(wandb_dir: Path) -> str:
    """The W&B run id of this run directory: read from ``wandb_dir/run_id``, or made up and written there."""
    path = wandb_dir / "run_id"
    try:
        kept = path.read_text().strip()
    except FileNotFoundError:
        kept = None
    if kept is not None and RUN_ID.fullmatch(kept):
        return kept
    if kept is not None:
        print(f"lucid train: {path}: {kept[:80]!r} is not a W&B run id; starting a new W&B run", flush=True)
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    wandb_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbLogger:
    """One W&B run for ``run_dir``; open it on rank 0 only (the caller decides)."""

    def __init__(self, cfg, run_dir: Path):
        import wandb

        section = cfg.logging.wandb
        run_dir = Path(run_dir).resolve()
        wandb_dir = run_dir / "wandb"
        config = to_dict(cfg)
        config["run_dir"] = str(run_dir)
        self.run = wandb.init(
            project=section.project,
            name=section.name if section.name is not None else run_dir.name,
            entity=section.entity,
            mode=section.mode,
            # W&B writes under DIR/wandb/: RUN_DIR/wandb, beside run_id
            dir=str(run_dir),
            config=config,
            id=stable_run_id(wandb_dir),
            resume="allow",
            # the console stays ours (RUN_DIR/logs/, runtime/console.py); the line below says where the run is
            settings=wandb.Settings(console="off", silent=True),
        )
        # A resumed online run continues after the last step W&B has; the steps between the checkpoint and
        # that one are trained again but W&B keeps the first values it got (it takes no step twice).
        self.first_step = self.run.starting_step
        self.skipped = False
        self._say_where(section.mode)

    def _say_where(self, mode: str) -> None:
        if mode == "disabled":
            return
        if mode == "offline":
            where = f"offline in {Path(self.run.dir).parent} (upload it with `wandb sync` on that directory)"
        else:
            where = self.run.url
        print(f"lucid train: W&B run {self.run.id}: {where}", flush=True)

    def _step_kept(self, step: int) -> bool:
        if step >= self.first_step:
            return True
        if not self.skipped:
            self.skipped = True
            print(f"lucid train: W&B run {self.run.id} already has steps up to {self.first_step - 1}; "
                  "logging to it again from the step after that", flush=True)
        return False

    def log(self, step: int, values: dict) -> None:
        """A metrics.jsonl record's scalars, under their TensorBoard tags."""
        scalars = {}
        for key, value in values.items():
            tag = tensorboard_tag(key)
            if tag is not None and value is not None:
                scalars[tag] = value
        if scalars and self._step_kept(step):
            self.run.log(scalars, step=step)

    def static(self, step: int, values: dict) -> None:
        """Run facts (world layout, ZeRO stage) as ``layout/<key>``, like TensorBoard's."""
        if values:
            # a resumed online run's first step may be past this one: the layout holds from there on
            self.run.log({f"layout/{key}": value for key, value in values.items()}, step=max(step, self.first_step))

    def close(self) -> None:
        self.run.finish()
