"""Atomic, reshardable training checkpoints.

Layout of ``RUN_DIR/checkpoints/``::

    step_00000100/
        model/          Megatron dist_checkpointing (torch_dist): weights, reshardable across TP/DP/CP
        optimizer/      AdamW's state (fp32 master, both moments; step count): each rank's ZeRO fragments,
                        written once by the rank that holds them, reshardable across TP/DP/ZeRO stage
        rng/rank_K.pt   each rank's RNG streams
        state.json      step, data-stream positions, counters, the layout it was saved with, tokenizer,
                        LR schedule (each part of the run's state writes its own keys)
        model.yaml      the model architecture (what converters and evaluators need to rebuild it)
        COMPLETE        written last inside the directory
    latest              name of the newest complete checkpoint, replaced atomically after publishing

A save writes into ``step_XXXXXXXX.partial/`` and renames it only when every rank has finished and
``COMPLETE`` is written, then replaces ``latest``: a process killed at any moment leaves the previous
checkpoint intact and ``latest`` pointing at it.  Resuming reads ``model/`` and ``optimizer/`` into the
current layout (``optimizer_state.py``): on the layout it was saved with the values are the same bits, and the
RNG streams are restored too (bit-exact continuation); on another TP/DP/ZeRO layout they are resharded and
only the per-rank RNG streams restart.  Checkpoints written before ``optimizer/`` was the only optimizer state
also hold ``deepspeed/`` (DeepSpeed's own per-rank files), read only when ``optimizer/`` is absent.

Only the newest ``keep_last`` checkpoints stay.  A reader (``lucid convert``, ``lucid eval``) opens one with
:func:`reading`, which holds it for the read: the rotation skips a checkpoint that is being read (a later save
removes it), and a reader whose newest checkpoint was removed before it could hold it reads the new newest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pickle
import pickletools
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
import yaml
# Megatron is imported where it is used: `lucid train` reads checkpoints' records (state.json, model.yaml) in
# its launcher process, which should not pay Megatron's import (seconds) before it starts the workers.

from lucid_megatron import atomic

from lucid_megatron.runtime import deepspeed_adapter as ds

from .optimizer_state import load_optimizer_state, own_storage, save_optimizer_state

STEP_DIR = re.compile(r"^step_(\d{8})$")


class Stateful(Protocol):
    """An object that saves and loads its own part of a run's state (torchtitan's Stateful pattern)."""

    def state_dict(self) -> dict[str, object]: ...

    def load_state_dict(self, state: dict[str, object]) -> None: ...


class RngStreams:
    """This rank's random streams: torch's CPU generator, Megatron's tracker (its TP-aware CUDA streams) and,
    on a GPU, the current device's generator.  Saved per rank as ``rng/rank_K.pt``."""

    def state_dict(self) -> dict[str, object]:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, object]) -> None:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        torch.set_rng_state(state["cpu"])
        get_cuda_rng_tracker().set_states(state["tracker"])
        if torch.cuda.is_available() and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])


def _weights_to_save(engine) -> dict:
    """The model's sharded state dict, factories applied, each host tensor over exactly its own memory (ZeRO
    keeps the weights in flat buffers; see ``own_storage``).  Under ZeRO-3 (called with the weights gathered)
    they are copied to the host now: the gathered buffers are released, and may be reused, when the gather ends,
    before a background write is staged."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sharded = engine.module.sharded_state_dict()
    apply_factories(sharded)
    gathered = ds.zero_stage(engine) == 3
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor) and value.data is not None:
            value.data = value.data.detach().to("cpu", copy=True) if gathered else own_storage(value.data)
    return sharded


def _one_after_the_other(first, second):
    """One background write of two of Megatron's async save requests: one writer process runs them in order, so
    their results reach Megatron's write-result queue (one per process, shared by every request) in the order
    their finalizers read them.  Two requests in flight at once could each read the other's results."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    parts = [request for request in (first, second) if request is not None]

    def stage():
        staged = []
        for request in parts:
            args = list(request.async_fn_args)
            if request.preload_fn is not None:
                args[1] = request.preload_fn()  # Megatron's convention: the write buckets, copied to the host
            staged.append((request.async_fn, args, request.async_fn_kwargs))
        return staged

    def write(_, staged):
        for function, args, kwargs in staged:
            if function is not None:
                function(*args, **kwargs)

    return AsyncRequest(write, (None, None), [fn for request in parts for fn in request.finalize_fns],
                        preload_fn=stage)


@dataclasses.dataclass(frozen=True)
class PendingSave:
    """A checkpoint whose files are being written in the background; published when every rank is done."""

    step: int
    path: Path  # where it will appear
    started: float  # time.monotonic() when the training loop went on


class Checkpointer:
    """Writes and finds a run's checkpoints.  ``async_save``: a save copies the state to host memory and returns;
    forked processes write the files (Megatron's async dist-checkpointing) while training goes on, and the
    checkpoint is published (``COMPLETE``, rename, ``latest``) at the first ``poll``/``wait`` after every rank's
    writes finished.  At most one save is in flight: ``save`` waits for the previous one first.  Only the newest
    ``keep_last`` checkpoints are kept, except one that a reader holds (:func:`reading`): a later save removes it.
    ``say`` reports what the rotation keeps or cannot check (default: a warning), once per checkpoint."""

    def __init__(self, root: str | Path, keep_last: int = 2, async_save: bool = False,
                 say: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.pending: PendingSave | None = None
        self._queue = None  # Megatron's AsyncCallsQueue, made at the first asynchronous save
        self._say = say or _warn
        self._said: set[str] = set()

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

    # ---- saving (collective: every rank calls these at the same point) -------------------------

    def save(self, step: int, engine, state: dict[str, object], rng: Stateful,
             files: dict[str, str] | None = None) -> Path:
        """Write checkpoint ``step``; returns where it appears (collective).  ``state``: the run's state, the same
        on every rank (rank 0 writes it to state.json); ``rng``: this rank's random streams; ``files``: extra text
        files, e.g. ``model.yaml``.  Asynchronous: returns once the state is staged; ``pending`` names it until
        ``poll``/``wait`` publishes it.  Call ``wait`` first to learn how long the previous save held this one."""
        self.wait()
        rank = dist.get_rank()
        final = self.step_dir(step)
        partial = final.with_name(final.name + ".partial")
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a save that was killed
                shutil.rmtree(partial)
            for part in ("model", "rng", "optimizer"):
                (partial / part).mkdir(parents=True)
        dist.barrier()
        from megatron.core import dist_checkpointing

        with ds.gathered_parameters(engine):
            model_write = dist_checkpointing.save(_weights_to_save(engine), str(partial / "model"),
                                                  async_sharded_save=self.async_save)
        optimizer_write = save_optimizer_state(engine, partial / "optimizer", async_save=self.async_save)
        torch.save(rng.state_dict(), partial / "rng" / f"rank_{rank}.pt")
        if rank == 0:
            atomic.write_text(partial / "state.json", json.dumps({"step": step, **state}, indent=1))
            for name, text in (files or {}).items():
                atomic.write_text(partial / name, text)
        if not self.async_save:
            self._publish(partial, final)
            return final
        write = _one_after_the_other(model_write, optimizer_write)
        write.add_finalize_fn(lambda: self._publish(partial, final))  # after both parts' own finalizers
        if self._queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue(persistent=False)
        # Megatron's queue stages the tensors in host memory (from a GPU) and forks a writer process, which sees
        # the host memory as it was at the fork (on a CPU, that is the copy).
        self._queue.schedule_async_request(write)
        self.pending = PendingSave(step, final, time.monotonic())
        return final

    def _publish(self, partial: Path, final: Path) -> None:
        """Every rank's files are written: mark the checkpoint complete, rename it into place, point ``latest``
        at it, drop the oldest (collective)."""
        dist.barrier()
        if dist.get_rank() == 0:
            atomic.write_text(partial / "COMPLETE", "")
            if final.exists():  # an older save of the same step (e.g. re-run after preemption)
                shutil.rmtree(final)
            atomic.publish_dir(partial, final)
            atomic.write_text(self.root / "latest", final.name)
            self.remove_old()
        dist.barrier()

    def remove_old(self) -> list[Path]:
        """Remove the complete checkpoints older than the newest ``keep_last`` (one process: rank 0), except
        those a reader holds (:func:`reading`); returns what was removed."""
        removed = []
        for old in self.complete_checkpoints()[: -self.keep_last]:
            kept, note = _remove_unless_read(old)
            if note:
                self._say_once(old.name if kept else "no locks", note)
            if not kept:
                removed.append(old)
        return removed

    def _say_once(self, key: str, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._say(text)

    def poll(self) -> Path | None:
        """Publish the save in flight if every rank has finished writing it (collective, one small all-reduce;
        nothing when no save is in flight).  Returns the checkpoint published, if any.  A write that failed
        raises here, on every rank, and the checkpoint is not published."""
        return self._finalize(blocking=False)

    def wait(self) -> float:
        """Block until the save in flight (if any) is written and published (collective); returns the seconds
        waited."""
        if self.pending is None:
            return 0.0
        start = time.monotonic()
        self._finalize(blocking=True)
        return time.monotonic() - start

    def _finalize(self, blocking: bool) -> Path | None:
        if self.pending is None:
            return None
        pending = self.pending
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException:
            self.pending = None
            self.abandon()
            raise
        if self._queue.get_num_unfinalized_calls():
            return None
        self.pending = None
        return pending.path

    def abandon(self) -> None:
        """Stop waiting for background writes (after a failure): their checkpoint is never published."""
        if self._queue is not None:
            for _, caller, _ in list(self._queue.async_calls):
                caller.close(abort=True)
            self._queue.async_calls.clear()
        self.pending = None

    # ---- loading --------------------------------------------------------------------------------

    @staticmethod
    def load_weights(path: Path, model: torch.nn.Module) -> None:
        """Megatron-format weights into a (not yet DeepSpeed-wrapped) model, any TP/DP layout.

        The index is checked first: torch unpickles it without restriction, so a crafted one could run code.
        """
        problem = unsafe_model_index(Path(path) / "model")
        if problem:
            raise ValueError(f"{path}: {problem}")
        from megatron.core import dist_checkpointing

        state_dict = dist_checkpointing.load(model.sharded_state_dict(), str(Path(path) / "model"))
        model.load_state_dict(state_dict, strict=True)

    @staticmethod
    def load_training_state(path: Path, engine, rng: Stateful, same_layout: bool, layout_note: str) -> str:
        """Optimizer (and, on the same layout, RNG) state; returns what was restored, in words.

        ``optimizer/`` loads into any layout.  A checkpoint from before it was the only optimizer state and
        written without it has DeepSpeed's own files only: they load on the same layout; on another one
        weights, step and data position are restored and the AdamW moments restart from zero.
        """
        path = Path(path)
        has_optimizer = (path / "optimizer" / "common.pt").exists()
        if not same_layout:
            if not has_optimizer:
                return (f"{path.name} was saved with a different layout ({layout_note}) and without optimizer/: "
                        "weights, step and data position are restored, the AdamW moments restart from zero")
            steps = load_optimizer_state(engine, path / "optimizer")
            return (f"{path.name} was saved with a different layout ({layout_note}): weights and AdamW state "
                    f"({steps} updates) resharded to this layout")
        if has_optimizer:
            load_optimizer_state(engine, path / "optimizer")
        else:
            ds.load_legacy_state(engine, path / "deepspeed")
        rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
        rng.load_state_dict(torch.load(rng_file, weights_only=True))  # tensors only: a crafted file cannot run code
        return f"{path.name}: optimizer and RNG state restored"


# The only classes DeepSpeed's own state files (deepspeed/ of an older checkpoint) may name: its loader
# unpickles them without restriction, so they are checked before it reads a file.
DEEPSPEED_PICKLE_GLOBALS = ds.LEGACY_PICKLE_GLOBALS


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
    return any(local.numel() and not torch.isfinite(local).all() for local in ds.local_weights(engine))


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


# ---- reading a checkpoint while its run may still be training ------------------------------------------------
#
# A reader holds a shared flock on the step directory itself (nothing is created in it, so a checkpoint the
# reader may not write can be locked too); the rotation removes a checkpoint only under an exclusive one,
# taken without waiting.  Locks are per open file: the ranks of one reader each hold their own, and a process
# that dies releases its lock.


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=2)


def _remove_unless_read(step_dir: Path) -> tuple[bool, str | None]:
    """Remove checkpoint ``step_dir`` unless a reader holds it.  Returns (kept, what to tell the user)."""
    try:
        fd = os.open(step_dir, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return False, None
    note = None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, (f"keeping {step_dir} for now: a reader (lucid convert, lucid eval) holds it; "
                          "a later save removes it")
        except OSError as err:  # a filesystem without flock (some NFS and Lustre mounts)
            note = (f"cannot lock {step_dir} ({err.strerror}): old checkpoints are removed even while something "
                    "reads them")
        (step_dir / "COMPLETE").unlink(missing_ok=True)  # no longer a checkpoint, even if the removal is cut short
        shutil.rmtree(step_dir, ignore_errors=True)
    finally:
        os.close(fd)
    return False, note


def _same_directory(step_dir: Path, fd: int) -> bool:
    try:
        now, held = os.stat(step_dir), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _lock_for_reading(step_dir: Path, say: Callable[[str], None]) -> int | None:
    """A descriptor holding a shared lock on checkpoint ``step_dir``; None if the checkpoint was removed first.
    Waits while a rotation removes it (it holds the exclusive lock meanwhile)."""
    try:
        fd = os.open(step_dir, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as err:  # a filesystem without flock: read unprotected
        say(f"cannot lock {step_dir} ({err.strerror}): if its run is still training, it may remove it while it is read")
    if _same_directory(step_dir, fd) and (step_dir / "COMPLETE").exists():
        return fd
    os.close(fd)
    return None


_READ_ATTEMPTS = 10  # each retry means the run published a newer checkpoint meanwhile


def _gone(step_dir: Path) -> FileNotFoundError:
    """A step directory named explicitly that is not there (any more): rotated, most likely; not damaged."""
    return FileNotFoundError(f"checkpoint {str(step_dir)!r} does not exist: a run keeps only its newest "
                             "checkpoint.keep_last checkpoints (it removes older ones as it trains); give the run "
                             "directory to read its newest")


@contextlib.contextmanager
def reading(path: str | Path, *, say: Callable[[str], None] | None = None):
    """Resolve ``path`` as :func:`resolve_checkpoint` does and yield the checkpoint, held for the block: the
    ``keep_last`` rotation of a run still training does not remove it meanwhile.  If the newest checkpoint is
    removed between resolving and locking it, the then newest is read instead and ``say`` (default: a warning)
    tells so; a step directory named explicitly and removed so is a FileNotFoundError."""
    say = say or _warn
    path = Path(path)
    if STEP_DIR.match(path.name) and path.parent.is_dir() and not path.exists():
        raise _gone(path)
    removed = []
    for _ in range(_READ_ATTEMPTS):
        checkpoint = resolve_checkpoint(path)
        fd = _lock_for_reading(checkpoint, say)
        if fd is not None:
            break
        if checkpoint == path:
            raise _gone(path)
        removed.append(checkpoint.name)
    else:
        raise FileNotFoundError(f"{str(path)!r}: the newest checkpoint was removed {_READ_ATTEMPTS} times before it "
                                "could be read; its run saves faster than it can be opened")
    if removed:
        say(f"{', '.join(removed)} was removed by its run's checkpoint rotation (keep_last) before it could be "
            f"read; reading {checkpoint} instead")
    try:
        yield checkpoint
    finally:
        os.close(fd)


def save_weights_checkpoint(path: str | Path, model: torch.nn.Module, state: dict, files: dict[str, str]) -> Path:
    """A weights-only checkpoint directory (no optimizer state), e.g. from a Hugging Face import.

    Same layout as a training checkpoint's step directory, staged as ``.<name>.tmp-<pid>-<hex>`` next to
    ``path`` (see ``atomic``) and renamed when complete; ``path`` must be new or an empty directory.  Usable as
    ``checkpoint.init_from`` and by ``lucid convert``.  Collective.
    """
    path = Path(path)
    name = [None]
    if dist.get_rank() == 0:
        atomic.check_output_dir(path, label="checkpoint directory")
        atomic.remove_stale_staging(path)  # left by an import that was killed
        name = [str(atomic.staging_path(path))]
        (Path(name[0]) / "model").mkdir(parents=True)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)  # every rank writes into the one rank 0 made
    staging = Path(name[0])
    from megatron.core import dist_checkpointing

    try:
        dist_checkpointing.save(model.sharded_state_dict(), str(staging / "model"))
        dist.barrier()
        if dist.get_rank() == 0:
            atomic.write_text(staging / "state.json", json.dumps(state, indent=1))
            for name, text in files.items():
                atomic.write_text(staging / name, text)
            atomic.write_text(staging / "COMPLETE", "")
            atomic.publish_dir(staging, path)
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()
    return path


def read_state(checkpoint: str | Path) -> dict:
    """``state.json`` of a checkpoint: step, data positions, counters, layout, tokenizer, LR schedule."""
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
