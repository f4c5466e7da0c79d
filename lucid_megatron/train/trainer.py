"""The training loop: a small Trainer over the runtime (device, groups), data, engine, checkpoints and logs.

Runs in every process of a torchrun (or single-process) job: ``python -m lucid_megatron train ...``.
Reading order: :meth:`Trainer.setup` composes the pieces, one named step each; :meth:`Trainer.run` runs the loop,
which ends in a :class:`LoopOutcome`, then the one exit path that saves and says it; :meth:`Trainer.train_step`,
:meth:`Trainer.evaluate` and :meth:`Trainer.save` are one step each.  What a checkpoint restores besides the
weights and the optimizer is a :class:`~lucid_megatron.train.run_state.RunState`, whose parts each save and load
their own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import psutil
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from torch.distributed.checkpoint.api import CheckpointException
from torch.profiler import record_function

from lucid_megatron import atomic
from lucid_megatron.config.schema import ConfigError, to_dict
from lucid_megatron.config.train import TrainConfig, dump_config, parse_step_range
from lucid_megatron.data import loader as data_loader
from lucid_megatron.data.mixture import Mixture, SourceTotals, source_totals
from lucid_megatron.data.shards import Manifest
from lucid_megatron.data.synth import ensure_synth_dataset
from lucid_megatron.model.flops import StepFlops, peak_flops, step_flops
from lucid_megatron.runtime import deepspeed_adapter, start_runtime, stop_runtime
from lucid_megatron.runtime.parallelize import EngineOptions, build_engine, build_model, params_dtype

from lucid_megatron.checkpoint import (Checkpointer, checkpoint_problem, nonfinite_weights, read_state,
                                       resolve_checkpoint)
from .engine import StepResult, evaluate, rows_digest, train_step
from .metrics import MetricsLogger
from .profiler import StepProfiler
from .progress import RankProgress
from .run_lock import RunDirLock
from .run_state import DataPositions, DataRecord, LayoutRecord, RunState, TokenizerRecord, TrainProgress
from . import status
from .schedule import LRSchedule, gradient_accumulation_steps
from .signals import PreemptionFlag
from .step_times import COLUMNS, StepTimes, gather_rows, rank_time_report
from .validate import ResumePlan, check_dataset, check_resume, open_dataset, split_world


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. the loss stayed non-finite); the message says why."""


def write_status(run_dir: Path, state: str, step: int) -> None:
    """The run's state for job scripts (status.py), written by rank 0."""
    if dist.get_rank() == 0:
        status.write_status(run_dir, state, step)


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(f"lucid train: {text}", flush=True)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line; for an error re-raised from a DataLoader worker, the original's (its last line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    qualified = re.match(r"([\w.]+\.)?(\w+(?:Error|Exception)): ", last)  # "pkg.module.ShardError: ..."
    return (f"{qualified.group(2)}: {last[qualified.end():]}" if qualified else f"{type(err).__name__}: {last}")[:300]


@contextlib.contextmanager
def _refused_config():
    """A config the checks refuse stops the run with their message.  ``lucid train``'s preflight shows the same
    before any process starts; ranks that did not run it, and a synthetic dataset written just now, meet it here."""
    try:
        yield
    except ConfigError as err:
        raise TrainingStopped(str(err)) from None


def _weights_loader(path: Path):
    """Load a checkpoint's weights into a model; a failure names the checkpoint (DCP raises BaseException)."""

    def load(model) -> None:
        try:
            Checkpointer.load_weights(path, model)
        except (Exception, CheckpointException) as err:
            raise TrainingStopped(
                f"loading the weights of {path} failed ({type(err).__name__}: {str(err)[:300]}); resume from an "
                "earlier checkpoint with --resume PATH"
            ) from err

    return load


@dataclasses.dataclass(frozen=True)
class LoopOutcome:
    """How the loop ended: the status job scripts read (status.py), the last step done, and the signal that
    ended it (None: it reached train.steps, or train.stop_at_step when the status is ``stopped``)."""

    status: Literal["finished", "stopped", "preempted"]
    step: int
    signal_name: str | None = None

    def describe(self, checkpoint: Path, run_dir: Path, tensorboard: bool) -> str:
        """The last line the run prints: where its checkpoint is, and how to continue or what to look at
        (``tensorboard``: whether the run logged there, logging.tensorboard)."""
        resume_hint = f"continue with: lucid train <config> --run-dir {run_dir} --resume auto"
        if self.signal_name is not None:
            return f"received {self.signal_name} at step {self.step}: saved {checkpoint}. {resume_hint}"
        if self.status == "stopped":
            return f"stopping at step {self.step} (train.stop_at_step): saved {checkpoint}; {resume_hint}"
        board = f", TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}" if tensorboard else ""
        return (f"done: {self.step} steps. Run directory {run_dir}: checkpoint {checkpoint}, metrics "
                f"{run_dir / 'metrics.jsonl'}{board}")


def _save_failure(root: Path, step: int, err: BaseException, previous: Path | None) -> str:
    """What went wrong writing a checkpoint, where, and what is still there (torch's own message names neither)."""
    usage = shutil.disk_usage(root if root.exists() else root.parent)
    causes = [err, *([err.__cause__] if err.__cause__ else [])]
    full = any(getattr(e, "errno", None) == errno.ENOSPC for e in causes) or usage.free < 0.01 * usage.total
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    return (
        f"saving the checkpoint of step {step} under {root} failed ({reason}). "
        + (f"The file system is full: {usage.free / 2**20:.1f} MiB free of {usage.total / 2**30:.2f} GiB. "
           if full else f"{usage.free / 2**30:.2f} GiB free there. ")
        + (f"The previous checkpoint {previous} is intact (resume with --resume auto once there is room)."
           if previous else "No earlier checkpoint exists.")
    )


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: str | Path, resume: str | None = None,
                 preemption: PreemptionFlag | None = None, allow_change: Sequence[str] = ()):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.allow_change = tuple(allow_change)  # fields the resume may change (lucid train --allow-change)
        self.runtime = None
        self.engine = None
        self.metrics = None
        self.preemption = preemption  # the caller's, held beyond this run (lucid train); else our own
        self.owns_preemption = preemption is None
        self.lock = None
        self.checkpoints: Checkpointer | None = None
        self.last_saved: tuple[int, Path] | None = None
        self.progress: RankProgress | None = None  # where this rank is: the hang watchdog, the restart records
        self.step_times: StepTimes | None = None
        self.since_logged = [0.0, 0.0, 0.0]  # this rank's model FLOPs, hardware FLOPs, step seconds since the last log

    # ---- composition ---------------------------------------------------------------------------

    def setup(self) -> None:
        """Compose the run, one named step each, in the order each needs the one before."""
        self._start_runtime()
        self._start_progress()
        for part in (self._open_dataset, self._find_resume_point, self._check_resume, self._record_config,
                     self._build_engine, self._restore_state, self._open_loader, self._open_metrics):
            self.progress.enter(f"setup: {part.__name__.lstrip('_').replace('_', ' ')}")
            part()
        self.progress.enter("setup done", self.start_step)

    def _start_runtime(self) -> None:
        """Process groups and device for this world's split; the run directory locked (rank 0)."""
        cfg = self.cfg
        with _refused_config():
            self.layout = split_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.runtime = start_runtime(self.layout.tensor_parallel, self.layout.context_parallel,
                                     sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed,
                                     hierarchical_context_parallel_sizes=cfg.parallel.hierarchical_context_parallel_sizes,
                                     cp_comm_type=cfg.parallel.cp_comm_type,
                                     collective_timeout_s=cfg.train.collective_timeout_s)
        if self.owns_preemption:
            self.preemption = PreemptionFlag()
        if self.runtime.is_first_rank:
            self.lock = RunDirLock(self.run_dir).acquire()  # before anything is written there

    def _start_progress(self) -> None:
        """This rank's progress record and step times (after rank 0 holds the run's lock: a refused second run
        must not overwrite the records of the one running), every rank's host (to name a slow one)."""
        dist.barrier()
        rank = dist.get_rank()
        self.progress = RankProgress(self.run_dir, rank, log_path=self.run_dir / "logs" / f"rank_{rank}.log")
        self.step_times = StepTimes(self.runtime.device)
        steps = self.cfg.train.profile_steps
        self.profiler = StepProfiler(None if steps is None else parse_step_range(steps), self.run_dir, rank,
                                     self.runtime.device)
        self.runtime = dataclasses.replace(self.runtime, collective_clock=self.step_times.collective)
        self.hosts = [None] * dist.get_world_size()
        dist.all_gather_object(self.hosts, socket.gethostname())

    def _open_dataset(self) -> None:
        """Rank 0 writes the synthetic dataset when configured and missing; then every rank checks it fits.
        ``manifest`` is the dataset's, or a mixture's first source's (its tokenizer is every source's)."""
        if self.runtime.is_first_rank and self.cfg.data.synth is not None:
            ensure_synth_dataset(self.cfg.data, say=_say)
        dist.barrier()
        with _refused_config():
            self.dataset = open_dataset(self.cfg)
            check_dataset(self.cfg, self.dataset, self.layout)
        self.mixture = self.dataset if isinstance(self.dataset, Mixture) else None
        self.manifest = self.mixture.sources[0].manifest if self.mixture else self.dataset

    def _find_resume_point(self) -> None:
        """The run's checkpoints, and the one to resume (``resume_path``; None to start afresh)."""
        self.checkpoints = Checkpointer(self.run_dir / "checkpoints", self.cfg.checkpoint.keep_last,
                                        async_save=self.cfg.checkpoint.writes_in_background(self.runtime.device),
                                        say=_say)
        self.resume_path = None if self.resume is None else self._first_resumable()

    def _first_resumable(self) -> Path | None:
        """``--resume PATH``, or with ``auto`` the newest complete checkpoint that every rank can read (damaged
        or unsafe ones are skipped, saying why); None when there is none."""
        explicit = self.resume != "auto"
        candidates = [Path(self.resume)] if explicit else self.checkpoints.complete_checkpoints()[::-1]
        skipped = []
        for path in candidates:
            problems = [None] * dist.get_world_size()
            dist.all_gather_object(problems, checkpoint_problem(path, dist.get_rank()))
            problem = next((f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)
            if problem is None:
                return path
            _say(f"skipping checkpoint {path}: {problem}")
            skipped.append(f"{path.name} ({problem})")
        if skipped:
            raise TrainingStopped(
                f"no checkpoint can be resumed: {'; '.join(skipped)}. Fix or remove them (or start a new --run-dir)"
            )
        return None

    def _check_resume(self) -> None:
        """The config against the resumed checkpoint's run (``lucid train``'s preflight did the same, but
        ``--resume auto`` may have skipped a damaged checkpoint since): a change is refused unless --allow-change
        names it, and then said."""
        with _refused_config():
            self.resume_plan: ResumePlan = check_resume(self.cfg, self.resume_path, self.dataset, self.allow_change)
        for note in self.resume_plan.notes:
            _say(f"changed on resume (--allow-change): {note}")

    def _record_config(self) -> None:
        """RUN_DIR/config.yaml: the config this run trains with (rank 0).  A resume first keeps the previous one as
        config.step_N.yaml, N the step resumed from, so the config of every trained step stays on record."""
        if not self.runtime.is_first_rank:
            return
        current = self.run_dir / "config.yaml"
        kept = self.run_dir / f"config.step_{self.resume_plan.step:08d}.yaml"
        # kept already there: an earlier resume from this step moved it, and it is the config that trained up to it
        if self.resume_path is not None and current.exists() and not kept.exists():
            os.replace(current, kept)
        atomic.write_text(current, dump_config(self.cfg))

    def _weights_source(self) -> Path | None:
        """Where the model's weights come from: the resumed checkpoint, checkpoint.init_from, or None (fresh)."""
        if self.resume_path is not None:
            _say(f"resuming from {self.resume_path}")
            return self.resume_path
        if self.cfg.checkpoint.init_from:
            source = resolve_checkpoint(self.cfg.checkpoint.init_from)
            _say(f"initialising weights from {source}")
            return source
        return None

    def _build_engine(self) -> None:
        """The model (its weights loaded, if any) wrapped in DeepSpeed's engine."""
        cfg = self.cfg
        source = self._weights_source()
        self.grad_accum = gradient_accumulation_steps(cfg, self.layout)
        model = build_model(self.runtime, cfg.model, cfg.parallel, precision=cfg.train.precision,
                            attention_backend=cfg.train.attention_backend,
                            activation_checkpointing=cfg.train.activation_checkpointing,
                            load=None if source is None else _weights_loader(source))
        bf16 = params_dtype(cfg.train.precision, self.runtime.device) == torch.bfloat16
        try:
            self.engine = self._start_engine(model, bf16)
        except deepspeed_adapter.UntestedDeepSpeed as err:
            raise TrainingStopped(str(err)) from None
        self.model_yaml = yaml.safe_dump(to_dict(cfg.model), sort_keys=False)

    def _start_engine(self, model, bf16: bool):
        cfg = self.cfg
        return build_engine(model, EngineOptions(
            lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=self.grad_accum, zero_stage=cfg.train.zero_stage, grad_clip=cfg.optimizer.grad_clip,
            bf16=bf16, allow_untested_deepspeed=cfg.train.allow_untested_deepspeed,
        ))

    def _restore_state(self) -> None:
        """The run's state, fresh or as the resumed checkpoint saved it; its optimizer (and, on the same layout,
        RNG streams) loaded into the engine."""
        self.state = RunState(
            progress=TrainProgress(), data=DataPositions(), lr_schedule=LRSchedule(self.cfg),
            layout=LayoutRecord.of(self.layout, self.cfg.train.zero_stage),
            tokenizer=TokenizerRecord(self.manifest.tokenizer), dataset=DataRecord.of(self.cfg, self.dataset),
        )
        if self.resume_path is not None:
            self.state.load_state_dict(read_state(self.resume_path))
            if not self.resume_plan.keep_data_positions:
                self.state.data.drop()
            _say(Checkpointer.load_training_state(self.resume_path, self.engine, self.state.rng,
                                                  same_layout=self.state.layout.same_as_saved,
                                                  layout_note=self.state.layout.describe_change()))
        self.start_step = self.state.progress.step
        self.source_epochs = self._restored_source_totals().epochs

    def _open_loader(self) -> None:
        """This rank's training rows, from where the data positions stand."""
        cfg = self.cfg
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.loader = data_loader.make_train_loader(
            self.dataset, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.layout.data_parallel, num_streams=cfg.data.num_streams,
            num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle_shards=cfg.data.shuffle_shards,
            loss_tokens=cfg.data.loss_tokens, on_bad_shard=cfg.data.on_bad_shard,
            state=self.state.data.restored or None,
        )

    def _open_metrics(self) -> None:
        cfg = self.cfg
        wandb = None
        if cfg.logging.wandb is not None and self.runtime.is_first_rank:
            from .wandb_logger import WandbLogger  # the optional extra: imported only when asked for

            wandb = WandbLogger(cfg, self.run_dir)
        self.metrics = MetricsLogger(
            self.run_dir, enabled=self.runtime.is_first_rank, tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress, total_steps=cfg.train.steps, start_step=self.start_step,
            wandb=wandb,
        )
        self.metrics.static(self.start_step, self.state.layout.current)

    def _check_weights_finite(self, step: int, what: str) -> None:
        """Stop, publishing nothing, if an update made any weight NaN or infinite (collective)."""
        if not self.runtime.any_rank(nonfinite_weights(self.engine)):
            return
        write_status(self.run_dir, "failed", step)
        raise TrainingStopped(
            f"the weights are not finite after step {step} ({what}); nothing was saved. The last good checkpoint "
            f"is {self.checkpoints.latest()} (resume with --resume auto). Lower optimizer.lr or keep "
            "optimizer.grad_clip > 0."
        )

    # ---- one step each -------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg, state, times = self.cfg, self.state, self.step_times
        started = time.perf_counter()
        with times.step():
            with times.section("data_wait"), record_function("lucid::data"):
                micro_batches = [next(self.loader) for _ in range(self.grad_accum)]
                placed = self.runtime.micro_batches(micro_batches)
            lr = state.lr_schedule.step()
            result = train_step(self.engine, self.runtime, placed, lr, times.section)
            with times.section("data_wait"):
                state.data.advance(micro_batches)
                digest = rows_digest(self.runtime, micro_batches, cfg.train.seq_length)
        elapsed = time.perf_counter() - started
        flops = self._step_flops(micro_batches)
        self.since_logged = [self.since_logged[0] + flops.model_total, self.since_logged[1] + flops.hardware_total,
                             self.since_logged[2] + elapsed]

        state.progress.record(step, nonfinite=bool(result.nonfinite_micro_batches))
        if result.nonfinite_micro_batches:
            _say(
                f"step {step}: non-finite loss in {result.nonfinite_micro_batches}/{len(micro_batches)} "
                f"micro-batch(es) on some rank; {'step skipped' if result.skipped else 'those dropped'}"
            )
        if step % cfg.logging.interval == 0 or step == cfg.train.steps or result.nonfinite_micro_batches:
            self.metrics.log(step, {
                "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                "tokens": result.tokens,
                "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_length / elapsed,
                "tokens_per_s_per_gpu": cfg.train.global_batch_size * cfg.train.seq_length / elapsed
                / self.layout.world_size,
                "step_time_s": elapsed, "memory_gib": _memory_gib(self.runtime.device),
                "nonfinite_steps": state.progress.nonfinite_steps, "skipped": result.skipped, "data_digest": digest,
                **self._mixture_metrics(step), **self._gathered_metrics(step),
            })
        if not result.skipped:  # after the metrics line: the step's finite loss is on record
            self._check_weights_finite(step, "the update overflowed" + (" although the loss was finite"
                                                                        if math.isfinite(result.loss) else ""))
        return result

    def evaluate(self, step: int) -> None:
        """Validation loss on ``eval_rows`` rows of the valid split; a mixture evaluates each source's split and
        logs their losses and the mean weighted by the sources' weights (``valid_loss``)."""
        if self.cfg.data.eval_rows == 0:
            return
        if self.mixture is None:
            loss = self._valid_loss(self.manifest)
            if loss is not None:
                self.metrics.log(step, {"valid_loss": loss})
            return
        losses = {source.name: self._valid_loss(source.manifest) for source in self.mixture.sources}
        weights = {source.name: source.weight for source in self.mixture.sources if losses[source.name] is not None}
        if not weights:
            return
        if not any(weights.values()):  # only sources of weight 0 have a valid split: an unweighted mean
            weights = dict.fromkeys(weights, 1.0)
        mean = sum(w * losses[name] for name, w in weights.items()) / sum(weights.values())
        self.metrics.log(step, {"valid_loss": mean,
                                **{f"valid_loss/{name}": loss for name, loss in losses.items() if loss is not None}})

    def _valid_loss(self, manifest: Manifest) -> float | None:
        """The loss over the first ``eval_rows`` rows of ``manifest``'s valid split (collective); None without one."""
        cfg, valid = self.cfg, manifest.splits.get("valid")
        if not valid or not valid.shards:
            return None
        # A validation split is often a single shard: use as many streams as it has shards.
        eval_streams = max(1, min(cfg.data.num_streams, len(valid.shards)))
        batches = data_loader.make_eval_loader(
            manifest, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.layout.data_parallel, num_streams=eval_streams,
            max_rows=cfg.data.eval_rows, loss_tokens=cfg.data.loss_tokens,
        )
        padding = data_loader.MicroBatch.padding(cfg.train.micro_batch_size, cfg.train.seq_length,
                                                 int(manifest.tokenizer["pad_id"]))
        loss, _ = evaluate(self.engine, self.runtime, self.runtime.micro_batches(batches),
                           self.runtime.micro_batch(padding))
        return loss

    def _step_flops(self, micro_batches) -> StepFlops:
        """This rank's share of the step's FLOPs: its rows' documents (model/flops.py), split over the TP x CP
        ranks that hold the same rows."""
        flops = None
        for mb in micro_batches:
            part = step_flops(self.cfg.model, torch.diff(mb.cu_seqlens).tolist(),
                              activation_checkpointing=self.cfg.train.activation_checkpointing)
            flops = part if flops is None else flops + part
        share = self.layout.tensor_parallel * self.layout.context_parallel
        return StepFlops(*({k: v / share for k, v in d.items()} for d in (flops.forward, flops.model, flops.hardware)))

    def _gathered_metrics(self, step: int) -> dict[str, float]:
        """Since the last logged step, in one all-gather: every rank's step times (the slow ones named on the
        console) and FLOPs, which give TFLOP/s per GPU (model FLOPs, and hardware FLOPs with recomputation), MFU
        against the device's peak (left out where it is unknown, e.g. on CPU)."""
        started = time.perf_counter()
        model, hardware, seconds = self.since_logged
        self.since_logged = [0.0, 0.0, 0.0]
        rows = gather_rows(self.step_times.take() + [model, hardware], self.runtime.device)
        width = len(COLUMNS)
        metrics, slow = rank_time_report([row[:width] for row in rows], self.hosts, self.cfg.logging.straggler_factor)
        for line in slow:
            _say(f"step {step}: {line}")
        metrics["rank_time/gather_s"] = time.perf_counter() - started  # what the gauge costs (benchmarks/)
        world, device = self.layout.world_size, self.runtime.device
        per_gpu = [sum(row[width + i] for row in rows) / world / max(seconds, 1e-12) / 1e12 for i in (0, 1)]
        metrics.update(tflops_per_gpu=per_gpu[0], hardware_tflops_per_gpu=per_gpu[1])
        bf16 = params_dtype(self.cfg.train.precision, device) == torch.bfloat16
        peak = peak_flops(torch.cuda.get_device_name(device), bf16) if device.type == "cuda" else None
        if peak is not None:
            metrics["mfu"] = per_gpu[0] * 1e12 / peak
        return metrics

    # ---- a mixture's sources ---------------------------------------------------------------------

    def _restored_source_totals(self) -> SourceTotals:
        names = self.mixture.names if self.mixture else []
        return source_totals(self.state.data.restored.values(), names)

    def _mixture_metrics(self, step: int) -> dict[str, float]:
        """Per source: tokens packed so far, their share, and (upsampling) the share from long documents; says
        when a source ran out and started its next epoch.  Collective over the data-parallel group."""
        if self.mixture is None:
            return {}
        names = self.mixture.names
        dp_size = self.layout.data_parallel
        mine = {s: st for s, st in self.state.data.restored.items() if int(s) % dp_size == self.dp_rank}
        mine.update(self.state.data.advanced)  # this rank's streams, as far as it has read them
        local = source_totals(mine.values(), names)
        group = parallel_state.get_data_parallel_group(with_context_parallel=False)
        counts = self.runtime.all_reduce(self.runtime.tensor(
            [local.tokens[n] for n in names] + [local.long_tokens[n] for n in names], torch.int64), group=group)
        epochs = self.runtime.all_reduce(self.runtime.tensor([local.epochs[n] for n in names], torch.int64),
                                         group=group, op=dist.ReduceOp.MAX)
        counts, epochs = self.runtime.host(counts), self.runtime.host(epochs)
        tokens, long_tokens = dict(zip(names, counts[:len(names)])), dict(zip(names, counts[len(names):]))
        for name, epoch in zip(names, epochs):
            if epoch > self.source_epochs[name]:
                _say(f"step {step}: source {name!r} ran out of documents and started epoch {epoch} "
                     "(its documents are read again from here)")
                self.source_epochs[name] = epoch
        total = max(sum(tokens.values()), 1)
        values: dict[str, float] = {}
        for source in self.mixture.sources:
            name = source.name
            values[f"tokens/{name}"] = tokens[name]
            values[f"share/{name}"] = tokens[name] / total
            if source.upsample is not None:
                values[f"long_share/{name}"] = long_tokens[name] / max(tokens[name], 1)
        return values

    def save(self) -> Path:
        """Checkpoint the last step done (collective), unless it was just saved."""
        step = self.state.progress.step
        if self.last_saved is not None and self.last_saved[0] == step:
            return self.last_saved[1]
        self._check_weights_finite(step, "not saving a checkpoint of them")
        self.wait_for_checkpoint(step, reason="before the next one")
        state = self.state.state_dict()
        try:
            path = self.checkpoints.save(step, self.engine, state, self.state.rng,
                                         files={"model.yaml": self.model_yaml})
        except (Exception, CheckpointException) as err:  # CheckpointException is not an Exception
            raise self._checkpoint_failed(step, err) from err
        if self.checkpoints.pending is not None:
            _say(f"step {step}: writing {path.name} in the background (published when every rank is done)")
        self.last_saved = (step, path)
        return path

    def poll_checkpoint(self) -> None:
        """Publish a background save whose files every rank has written (collective when one is in flight)."""
        pending = self.checkpoints.pending
        if pending is None:
            return
        try:
            self.checkpoints.poll()
        except (Exception, CheckpointException) as err:
            raise self._checkpoint_failed(pending.step, err) from err

    def wait_for_checkpoint(self, step: int, reason: str) -> None:
        """Block until a background save is written and published, saying how long it held training."""
        pending = self.checkpoints.pending
        if pending is None:
            return
        try:
            waited = self.checkpoints.wait()
        except (Exception, CheckpointException) as err:
            raise self._checkpoint_failed(pending.step, err) from err
        _say(f"step {step}: waited {waited:.2f} s for {pending.path.name} to be written {reason} "
             f"({time.monotonic() - pending.started:.1f} s after it was staged)")

    def _checkpoint_failed(self, step: int, err: BaseException) -> TrainingStopped:
        """The run stops: the checkpoint of ``step`` was not written (same message, synchronous or not)."""
        message = _save_failure(self.checkpoints.root, step, err, self.checkpoints.latest())
        with contextlib.suppress(OSError):  # the same full disk may refuse this small file too
            write_status(self.run_dir, "failed", step)
        return TrainingStopped(message)

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
            if not self._nothing_to_do():
                self._finish(self._loop())
            return 0
        except BaseException as err:  # why this rank stops, for the restart record (train/restarts.py)
            if self.progress is not None:
                self.progress.failed(_one_line(err))
            raise
        finally:
            self.close()

    @contextlib.contextmanager
    def _phase(self, name: str, step: int | None = None):
        """This rank enters ``name`` (its progress record, the hang watchdog) and a collective failing inside
        names it."""
        self.progress.enter(name, step)
        with self.runtime.phase(name):
            yield

    def _nothing_to_do(self) -> bool:
        """The resumed checkpoint is already at train.steps: say so, and leave the run finished."""
        steps = self.cfg.train.steps
        if self.start_step < steps:
            return False
        _say(f"nothing to do: {self.resume_path} is at step {self.start_step} >= train.steps ({steps})")
        write_status(self.run_dir, "finished", self.start_step)
        return True

    def _announce(self) -> None:
        cfg, layout = self.cfg, self.layout
        write_status(self.run_dir, "running", self.start_step)
        _say(
            f"{cfg.train.steps} steps from step {self.start_step}; world {layout.world_size} = DP "
            f"{layout.data_parallel} x CP {layout.context_parallel} x TP {layout.tensor_parallel}, "
            f"ZeRO-{cfg.train.zero_stage}, {self.grad_accum} micro-batch(es) of {cfg.train.micro_batch_size} x "
            f"{cfg.train.seq_length} tokens per rank, {self.runtime.device}, "
            f"{str(params_dtype(cfg.train.precision, self.runtime.device)).removeprefix('torch.')}, "
            f"{cfg.model.spec} layers, {torch.get_num_threads()} CPU thread(s) per process"
        )

    def _loop(self) -> LoopOutcome:
        """Train from the step after ``start_step``; evaluate and save at their intervals; end at train.steps,
        train.stop_at_step or an agreed preemption signal."""
        cfg = self.cfg
        self._announce()
        self.progress.watch(cfg.train.hang_timeout_s)
        step = self.start_step
        for step in range(self.start_step + 1, cfg.train.steps + 1):
            with self._phase(f"training step {step}", step), self.profiler.step(step):
                self.train_step(step)
            with self._phase(f"publishing a checkpoint after step {step}"), self.step_times.section("checkpoint"):
                self.poll_checkpoint()
            if self.state.progress.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                write_status(self.run_dir, "failed", step)
                raise TrainingStopped(
                    f"the loss was non-finite for {self.state.progress.consecutive_nonfinite} consecutive steps "
                    f"(up to step {step}); stopping. The last checkpoint is {self.checkpoints.latest()}. Lower "
                    "optimizer.lr, keep optimizer.grad_clip > 0, or inspect the data of these steps."
                )
            if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0:
                with self._phase(f"validation after step {step}"), self.step_times.section("evaluation"):
                    self.evaluate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                with self._phase(f"saving the checkpoint of step {step}"), self.step_times.section("checkpoint"):
                    self.save()
            if step == cfg.train.stop_at_step:
                return LoopOutcome("stopped", step)
            with self._phase(f"the preemption check after step {step}"):
                preempted = self.preemption.agreed(self.runtime)
            if preempted:
                signal_name = self.preemption.received or "a preemption signal"
                # SIGINT is a person stopping the run (a job script must not requeue it); the others preempt it
                return LoopOutcome("stopped" if signal_name == "SIGINT" else "preempted", step, signal_name)
        if not (cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0):
            with self._phase(f"the final validation after step {step}"):
                self.evaluate(step)  # unless the interval just ran it
        return LoopOutcome("finished", step)

    def _finish(self, outcome: LoopOutcome) -> None:
        """The one exit path: save (unless this step was just saved), publish the state, say where things are."""
        with self._phase(f"saving the checkpoint of step {outcome.step}"):
            path = self.save()
            self.wait_for_checkpoint(outcome.step, reason="before exiting")
        write_status(self.run_dir, outcome.status, outcome.step)
        _say(outcome.describe(path, self.run_dir, tensorboard=self.cfg.logging.tensorboard))

    def close(self) -> None:
        if self.checkpoints is not None and self.checkpoints.pending is not None:
            self.checkpoints.abandon()  # stopped by an error: that checkpoint is never published
        if self.owns_preemption and self.preemption is not None:
            self.preemption.restore()
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            self.engine.destroy()
        if self.progress is not None:
            self.progress.close()
            self.profiler.close()
        if self.lock is not None:
            self.lock.release()
        stop_runtime()


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: str | None = None,
                 preemption: PreemptionFlag | None = None, allow_change: Sequence[str] = ()) -> int:
    return Trainer(cfg, run_dir, resume, preemption, allow_change).run()
