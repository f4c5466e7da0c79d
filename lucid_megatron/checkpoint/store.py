"""Atomic, reshardable training checkpoints.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000100/
        model/          Megatron dist_checkpointing (torch_dist): weights, reshardable across TP/DP/CP
        deepspeed/      DeepSpeed's optimizer state (Adam moments; tied to the TP x DP x ZeRO layout)
        optimizer/      the same AdamW state per parameter (dist_checkpointing, reshardable like model/)
        rng/rank_K.pt   each rank's RNG streams
        state.json      step, data-stream positions, counters, the layout it was saved with, tokenizer
        model.yaml      the model architecture (what converters and evaluators need to rebuild it)
        COMPLETE        written last inside the directory
    latest              name of the newest complete checkpoint, replaced atomically after publishing

A save writes into ``step_XXXXXXXX.partial/`` and renames it only when every rank has finished and
``COMPLETE`` is written, then replaces ``latest``: a process killed at any moment leaves the previous
checkpoint intact and ``latest`` pointing at it.  Resuming on the layout it was saved with loads
DeepSpeed's own state (bit-exact).  On another TP/DP/ZeRO layout the weights and ``optimizer/`` are
resharded by Megatron's dist_checkpointing and scattered into the new ZeRO partitions
(``optimizer_state.py``), so AdamW continues with its moments; only the per-rank RNG streams restart.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from lucid_megatron import atomic

from .optimizer_state import gathered_parameters, load_optimizer_state, save_optimizer_state

STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int = 2, reshardable_optimizer: bool = True):
        self.root = Path(root)
        self.keep_last = keep_last
        self.reshardable_optimizer = reshardable_optimizer  # also write optimizer/ (costs its size on disk)

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ---- finding -----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").exists()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names if it is complete, else the newest complete one."""
        pointer = self.root / "latest"
        if pointer.exists():
            candidate = self.root / pointer.read_text().strip()
            if (candidate / "COMPLETE").exists():
                return candidate
            warnings.warn(f"{pointer} names {candidate.name}, which is not a complete checkpoint; scanning")
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    # ---- saving (collective: every rank calls it) ----------------------------------------------

    def save(self, step: int, engine, state: dict, files: dict[str, str] | None = None) -> Path:
        """Write checkpoint ``step`` (collective). ``files``: extra text files, e.g. ``model.yaml``."""
        rank = dist.get_rank()
        final = self.step_dir(step)
        partial = final.with_name(final.name + ".partial")
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a save that was killed
                shutil.rmtree(partial)
            (partial / "model").mkdir(parents=True)
            (partial / "rng").mkdir()
        dist.barrier()
        with gathered_parameters(engine):
            dist_checkpointing.save(engine.module.sharded_state_dict(), str(partial / "model"))
        engine.save_checkpoint(str(partial / "deepspeed"), tag="state", save_latest=False)
        if self.reshardable_optimizer:
            if rank == 0:
                (partial / "optimizer").mkdir()
            dist.barrier()
            save_optimizer_state(engine, partial / "optimizer")
        torch.save(rng_state(), partial / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            atomic.write_text(partial / "state.json", json.dumps({"step": step, **state}, indent=1))
            for name, text in (files or {}).items():
                atomic.write_text(partial / name, text)
        dist.barrier()
        if rank == 0:
            atomic.write_text(partial / "COMPLETE", "")
            if final.exists():  # an older save of the same step (e.g. re-run after preemption)
                shutil.rmtree(final)
            atomic.publish_dir(partial, final)
            atomic.write_text(self.root / "latest", final.name)
            for old in self.complete_checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    # ---- loading --------------------------------------------------------------------------------

    @staticmethod
    def load_weights(path: Path, model: torch.nn.Module) -> None:
        """Megatron-format weights into a (not yet DeepSpeed-wrapped) model, any TP/DP layout.

        The index is checked first: torch unpickles it without restriction, so a crafted one could run code.
        """
        problem = unsafe_model_index(Path(path) / "model")
        if problem:
            raise ValueError(f"{path}: {problem}")
        state_dict = dist_checkpointing.load(model.sharded_state_dict(), str(Path(path) / "model"))
        model.load_state_dict(state_dict, strict=True)

    @staticmethod
    def load_training_state(path: Path, engine, same_layout: bool, layout_note: str) -> str:
        """Optimizer (and, on the same layout, RNG) state; returns what was restored, in words.

        Same layout: DeepSpeed's own files, bit-exact.  Another layout: the layout-free ``optimizer/`` copy,
        resharded; a checkpoint written without it restores weights, step and data position only.
        """
        path = Path(path)
        if not same_layout:
            if not (path / "optimizer" / "common.pt").exists():
                return (f"{path.name} was saved with a different layout ({layout_note}) and without optimizer/: "
                        "weights, step and data position are restored, the AdamW moments restart from zero")
            steps = load_optimizer_state(engine, path / "optimizer")
            return (f"{path.name} was saved with a different layout ({layout_note}): weights and AdamW state "
                    f"({steps} updates) resharded to this layout")
        engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_strict=True,
        )
        rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
        set_rng_state(torch.load(rng_file, weights_only=True))  # tensors only: a crafted file cannot run code
        return f"{path.name}: optimizer and RNG state restored"


# The only classes DeepSpeed's own state files may name (its loader unpickles them without restriction):
# checked before DeepSpeed reads a file, so a crafted file is refused instead of executed.
DEEPSPEED_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


_PICKLE_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                                "BINSTRING", "STRING"})


def pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` a pickle would import, read from its opcodes without running it."""
    found, memo, strings, top = set(), {}, [], None
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _PICKLE_STRING_OPS:
            strings.append(arg)
            top = arg
        elif name == "MEMOIZE":
            memo[len(memo)] = top
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = top
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(arg)
            strings.append(top)
        elif name == "GLOBAL":
            found.add(arg.replace(" ", "."))
            top = None
        elif name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}" if len(strings) >= 2 else "<unknown>")
            top = None
        elif name not in ("FRAME", "PROTO"):
            top = None
    return found


def _allowed_in_dcp_metadata(name: str) -> bool:
    """Torch's distributed-checkpoint index (pickled, and unpickled without restriction by torch) may name
    its own metadata classes, torch.Size, dtypes and layouts; nothing else."""
    if name.startswith("torch.distributed.checkpoint.") or name in ("torch.Size", "torch.serialization._get_layout"):
        return True
    module, _, attr = name.rpartition(".")
    return module == "torch" and isinstance(getattr(torch, attr, None), torch.dtype)


def unsafe_model_index(model_dir: Path) -> str | None:
    """Why the distributed checkpoint's pickled index must not be loaded (None: it names only safe classes)."""
    path = Path(model_dir) / ".metadata"
    unsafe = sorted(g for g in pickle_globals(path.read_bytes()) if not _allowed_in_dcp_metadata(g))
    if unsafe:
        return f"{path.parent.name}/.metadata names classes outside a checkpoint index ({', '.join(unsafe)}): refused"
    return None


def checkpoint_problem(path: Path, rank: int) -> str | None:
    """Why this rank cannot resume from ``path`` (None: complete, intact and safe as far as can be read).

    Reads every small file whole and checks the large ones' structure: state.json and model.yaml parse;
    each model shard is as long as the index says; this rank's RNG file loads as plain tensors; every
    DeepSpeed file is a readable archive whose pickled classes are all in DEEPSPEED_PICKLE_GLOBALS.
    """
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            return "state.json has no step"
        if (path / "model.yaml").exists():
            yaml.safe_load((path / "model.yaml").read_text())
        for part in ("model", "optimizer"):  # Megatron distributed checkpoints (optimizer/ is optional)
            if part == "optimizer" and not (path / part).exists():
                continue
            if part == "model" or (path / part / ".metadata").exists():  # no tensors before AdamW's 1st update
                problem = unsafe_model_index(path / part) or _model_shards_problem(path / part)
                if problem:
                    return problem
            for file in sorted((path / part).glob("*.pt")):  # Megatron's common state: plain data only
                if torch.serialization.get_unsafe_globals_in_checkpoint(str(file)):
                    return f"{file.relative_to(path)} names Python classes: refused"
        rng = path / "rng" / f"rank_{rank}.pt"
        if rng.exists():
            torch.load(rng, weights_only=True)
        for file in sorted((path / "deepspeed").rglob("*.pt")):
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file))) - DEEPSPEED_PICKLE_GLOBALS
            if unsafe:
                return f"{file.relative_to(path)} names classes outside DeepSpeed's state ({', '.join(sorted(unsafe))}): refused"
    except FileNotFoundError as err:
        return f"{err.filename or err} is missing"
    except (OSError, ValueError, RuntimeError, EOFError, IndexError, pickle.UnpicklingError, yaml.YAMLError) as err:
        where = getattr(err, "filename", None)
        return f"unreadable{' ' + str(where) if where else ''}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _model_shards_problem(model_dir: Path) -> str | None:
    """Each file of the distributed checkpoint must reach the end of the last item the index places in it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(model_dir)).read_metadata()
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (model_dir / name).stat().st_size
        if size < end:
            return f"{model_dir.name}/{name} is truncated ({size} bytes, the index needs {end})"
    return None


def nonfinite_weights(engine) -> bool:
    """True if any weight held by this rank is NaN or infinite (under ZeRO-3: this rank's partitions)."""
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", None) if engine.zero_optimization_stage() == 3 else p
        if local is not None and local.numel() and not torch.isfinite(local).all():
            return True
    return False


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or the newest complete one under a checkpoints directory or a run directory."""
    path = Path(path)
    if (path / "COMPLETE").exists():
        return path
    for root in (path / "checkpoints", path):
        latest = Checkpointer(root).latest()
        if latest is not None:
            return latest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    raise FileNotFoundError(
        f"{str(path)!r} is not a complete checkpoint (no COMPLETE file) and holds none "
        "(expected RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXXXX)"
    )


def save_weights_checkpoint(path: str | Path, model: torch.nn.Module, state: dict, files: dict[str, str]) -> Path:
    """A weights-only checkpoint directory (no optimizer state), e.g. from a Hugging Face import.

    Same layout as a training checkpoint's step directory, written to ``PATH.partial`` and renamed when
    complete; usable as ``checkpoint.init_from`` and by ``lucid convert``.  Collective.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0:
        if path.exists():
            raise FileExistsError(f"{path} already exists; choose a new checkpoint directory")
        if partial.exists():
            shutil.rmtree(partial)
        (partial / "model").mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(partial / "model"))
    dist.barrier()
    if dist.get_rank() == 0:
        atomic.write_text(partial / "state.json", json.dumps(state, indent=1))
        for name, text in files.items():
            atomic.write_text(partial / name, text)
        atomic.write_text(partial / "COMPLETE", "")
        atomic.publish_dir(partial, path)
    dist.barrier()
    return path


def read_state(checkpoint: str | Path) -> dict:
    """``state.json`` of a checkpoint: step, data positions, counters, layout, tokenizer."""
    path = Path(checkpoint) / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return json.loads(path.read_text())


def read_model_config(checkpoint: str | Path, *, required: bool = True):
    """The ``ModelConfig`` a checkpoint records in ``model.yaml``; None if absent and not ``required``."""
    from lucid_megatron.config.model import ModelConfig
    from lucid_megatron.config.schema import from_dict, read_yaml_file

    path = Path(checkpoint) / "model.yaml"
    if not path.exists():
        if not required:
            return None
        raise FileNotFoundError(f"{path} is missing: the checkpoint does not record its model architecture")
    return from_dict(ModelConfig, read_yaml_file(path), "checkpoint model")
