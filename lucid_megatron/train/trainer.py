"""The training loop: a small Trainer over the runtime (device, groups), data, engine, checkpoints and logs.

Runs in every process of a torchrun (or single-process) job: ``python -m lucid_megatron train ...``.
Reading order: :meth:`Trainer.setup` composes the pieces, :meth:`Trainer.run` is the loop and its one
exit path, :meth:`Trainer.train_step`, :meth:`Trainer.evaluate` and :meth:`Trainer.save` are one step each.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from torch.distributed.checkpoint.api import CheckpointException

from lucid_megatron.config.schema import to_dict
from lucid_megatron.config.train import TrainConfig, dump_config
from lucid_megatron.data import loader as data_loader
from lucid_megatron.data.shards import read_manifest
from lucid_megatron.data.synth import ensure_synth_dataset
from lucid_megatron.runtime import start_runtime, stop_runtime
from lucid_megatron.runtime.parallelize import EngineOptions, build_engine, build_model, params_dtype

from lucid_megatron.checkpoint import (Checkpointer, checkpoint_problem, nonfinite_weights, read_state,
                                       resolve_checkpoint)
from .engine import StepResult, evaluate, rows_digest, train_step
from .metrics import MetricsLogger
from .run_lock import RunDirLock
from . import status
from .schedule import check_layout, gradient_accumulation_steps, lr_at
from .signals import PreemptionFlag


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


def _gather_stream_states(local: dict) -> dict:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


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
                 preemption: PreemptionFlag | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.runtime = None
        self.engine = None
        self.metrics = None
        self.preemption = preemption  # the caller's, held beyond this run (lucid train); else our own
        self.owns_preemption = preemption is None
        self.lock = None
        self.last_saved: tuple[int, Path] | None = None

    # ---- composition ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        self.layout = check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.runtime = start_runtime(self.layout.tensor_parallel, self.layout.context_parallel,
                                     sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed,
                                     hierarchical_context_parallel_sizes=cfg.parallel.hierarchical_context_parallel_sizes,
                                     collective_timeout_s=cfg.train.collective_timeout_s)
        if self.owns_preemption:
            self.preemption = PreemptionFlag()
        if self.runtime.is_first_rank:
            self.lock = RunDirLock(run_dir).acquire()  # before anything is written there
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        self._ensure_dataset()
        self.manifest = read_manifest(cfg.data.path)
        data_loader.check_layout(self.manifest, cfg.data.num_streams, self.layout.data_parallel,
                                 cfg.data.num_workers, cfg.train.global_batch_size)
        if self.manifest.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise TrainingStopped(
                f"the dataset's tokenizer has {self.manifest.tokenizer['vocab_size']} tokens but model.vocab_size "
                f"is {cfg.model.vocab_size}"
            )

        self.checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last,
                                        reshardable_optimizer=cfg.checkpoint.reshardable_optimizer)
        resume_path = self._resume_point()
        state, load = {}, None
        if resume_path is not None:
            _say(f"resuming from {resume_path}")
            state = read_state(resume_path)
            load = _weights_loader(resume_path)
        elif cfg.checkpoint.init_from:
            source = resolve_checkpoint(cfg.checkpoint.init_from)
            _say(f"initialising weights from {source}")
            load = _weights_loader(source)

        self.grad_accum = gradient_accumulation_steps(cfg, self.layout)
        model = build_model(self.runtime, cfg.model, cfg.parallel, precision=cfg.train.precision,
                            attention_backend=cfg.train.attention_backend,
                            activation_checkpointing=cfg.train.activation_checkpointing, load=load)
        bf16 = params_dtype(cfg.train.precision, self.runtime.device) == torch.bfloat16
        self.engine = build_engine(model, EngineOptions(
            lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay, micro_batch_size=cfg.train.micro_batch_size,
            grad_accum=self.grad_accum, zero_stage=cfg.train.zero_stage, grad_clip=cfg.optimizer.grad_clip,
            bf16=bf16,
        ))
        self.layout_record = {
            "world_size": self.layout.world_size, "tensor_parallel": self.layout.tensor_parallel,
            "context_parallel": self.layout.context_parallel, "data_parallel": self.layout.data_parallel,
            "zero_stage": cfg.train.zero_stage,
        }
        if resume_path is not None:
            saved = state.get("layout")
            _say(Checkpointer.load_training_state(resume_path, self.engine, same_layout=saved == self.layout_record,
                                                  layout_note=f"saved {saved}, now {self.layout_record}"))
        self.resume_path = resume_path
        self.start_step = state.get("step", 0)
        self.nonfinite_total = state.get("nonfinite_steps", 0)
        self.consecutive_nonfinite = 0
        self.stream_states = dict(state.get("data", {}))
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.loader = data_loader.make_train_loader(
            cfg.data.path, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.layout.data_parallel, num_streams=cfg.data.num_streams,
            num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle_shards=cfg.data.shuffle_shards,
            loss_tokens=cfg.data.loss_tokens, on_bad_shard=cfg.data.on_bad_shard, state=self.stream_states or None,
        )
        self.metrics = MetricsLogger(
            run_dir, enabled=self.runtime.is_first_rank, tensorboard=cfg.logging.tensorboard,
            progress=cfg.logging.progress, total_steps=cfg.train.steps, start_step=self.start_step,
        )
        self.metrics.static(self.start_step, self.layout_record)
        self.model_yaml = yaml.safe_dump(to_dict(cfg.model), sort_keys=False)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume: ``--resume PATH``, or with ``auto`` the newest complete one that every
        rank can read (damaged or unsafe ones are skipped, saying why); None to start afresh."""
        if self.resume is None:
            return None
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

    def _ensure_dataset(self) -> None:
        """Rank 0 writes the synthetic dataset when configured and missing; the others wait."""
        if self.runtime.is_first_rank:
            ensure_synth_dataset(self.cfg.data, say=_say)
        dist.barrier()

    # ---- one step each -------------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        cfg = self.cfg
        started = time.perf_counter()
        micro_batches = [next(self.loader) for _ in range(self.grad_accum)]
        result = train_step(self.engine, self.runtime, self.runtime.micro_batches(micro_batches), lr_at(cfg, step))
        for mb in micro_batches:
            self.stream_states.update(mb.stream_states)
        digest = rows_digest(self.runtime, micro_batches, cfg.train.seq_length)
        elapsed = time.perf_counter() - started

        if result.nonfinite_micro_batches:
            self.nonfinite_total += 1
            self.consecutive_nonfinite += 1
            _say(
                f"step {step}: non-finite loss in {result.nonfinite_micro_batches}/{len(micro_batches)} "
                f"micro-batch(es) on some rank; {'step skipped' if result.skipped else 'those dropped'}"
            )
        else:
            self.consecutive_nonfinite = 0
        if step % cfg.logging.interval == 0 or step == cfg.train.steps or result.nonfinite_micro_batches:
            self.metrics.log(step, {
                "loss": result.loss, "lr": lr_at(cfg, step), "grad_norm": result.grad_norm,
                "tokens": result.tokens,
                "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_length / elapsed,
                "step_time_s": elapsed, "memory_gib": _memory_gib(self.runtime.device),
                "nonfinite_steps": self.nonfinite_total, "skipped": result.skipped, "data_digest": digest,
            })
        if not result.skipped:  # after the metrics line: the step's finite loss is on record
            self._check_weights_finite(step, "the update overflowed" + (" although the loss was finite"
                                                                        if math.isfinite(result.loss) else ""))
        return result

    def evaluate(self, step: int) -> None:
        cfg, valid = self.cfg, self.manifest.splits.get("valid")
        if cfg.data.eval_rows == 0 or not valid or not valid.shards:
            return
        # A validation split is often a single shard: use as many streams as it has shards.
        eval_streams = max(1, min(cfg.data.num_streams, len(valid.shards)))
        batches = data_loader.make_eval_loader(
            cfg.data.path, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.layout.data_parallel, num_streams=eval_streams,
            max_rows=cfg.data.eval_rows, loss_tokens=cfg.data.loss_tokens,
        )
        padding = data_loader.MicroBatch.padding(cfg.train.micro_batch_size, cfg.train.seq_length,
                                                 int(self.manifest.tokenizer["pad_id"]))
        loss, _ = evaluate(self.engine, self.runtime, self.runtime.micro_batches(batches),
                           self.runtime.micro_batch(padding))
        self.metrics.log(step, {"valid_loss": loss})

    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (collective), unless it was just saved."""
        if self.last_saved is not None and self.last_saved[0] == step:
            return self.last_saved[1]
        self._check_weights_finite(step, "not saving a checkpoint of them")
        state = {
            "layout": self.layout_record,
            "data": _gather_stream_states(self.stream_states),
            "nonfinite_steps": self.nonfinite_total,
            "tokenizer": self.manifest.tokenizer,
        }
        try:
            path = self.checkpoints.save(step, self.engine, state, files={"model.yaml": self.model_yaml})
        except (Exception, CheckpointException) as err:  # CheckpointException is not an Exception
            message = _save_failure(self.checkpoints.root, step, err, self.checkpoints.latest())
            with contextlib.suppress(OSError):  # the same full disk may refuse this small file too
                write_status(self.run_dir, "failed", step)
            raise TrainingStopped(message) from err
        self.last_saved = (step, path)
        return path

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
            return self._loop()
        finally:
            self.close()

    def _phase(self, name: str):
        return self.runtime.phase(name)

    def _loop(self) -> int:
        cfg, run_dir = self.cfg, self.run_dir
        if self.start_step >= cfg.train.steps:
            _say(f"nothing to do: {self.resume_path} is at step {self.start_step} >= train.steps ({cfg.train.steps})")
            write_status(run_dir, "finished", self.start_step)
            return 0
        write_status(run_dir, "running", self.start_step)
        _say(
            f"{cfg.train.steps} steps from step {self.start_step}; world {self.layout.world_size} = DP "
            f"{self.layout.data_parallel} x CP {self.layout.context_parallel} x TP {self.layout.tensor_parallel}, "
            f"ZeRO-{cfg.train.zero_stage}, {self.grad_accum} micro-batch(es) of {cfg.train.micro_batch_size} x "
            f"{cfg.train.seq_length} tokens per rank, {self.runtime.device}, "
            f"{str(params_dtype(cfg.train.precision, self.runtime.device)).removeprefix('torch.')}, "
            f"{cfg.model.spec} layers, {torch.get_num_threads()} CPU thread(s) per process"
        )
        step, outcome = self.start_step, "finished"
        resume_hint = f"continue with: lucid train <config> --run-dir {run_dir} --resume auto"
        for step in range(self.start_step + 1, cfg.train.steps + 1):
            with self._phase(f"training step {step}"):
                self.train_step(step)
            if self.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                write_status(run_dir, "failed", step)
                raise TrainingStopped(
                    f"the loss was non-finite for {self.consecutive_nonfinite} consecutive steps (up to step "
                    f"{step}); stopping. The last checkpoint is {self.checkpoints.latest()}. Lower optimizer.lr, "
                    "keep optimizer.grad_clip > 0, or inspect the data of these steps."
                )
            if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0:
                with self._phase(f"validation after step {step}"):
                    self.evaluate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                with self._phase(f"saving the checkpoint of step {step}"):
                    self.save(step)
            if step == cfg.train.stop_at_step:
                outcome = "stopped"
                describe = lambda path: f"stopping at step {step} (train.stop_at_step): saved {path}; {resume_hint}"  # noqa: E731
                break
            with self._phase(f"the preemption check after step {step}"):
                preempted = self.preemption.agreed(self.runtime)
            if preempted:
                signal_name = self.preemption.received or "a preemption signal"
                # SIGINT is a person stopping the run (a job script must not requeue it); the others preempt it
                outcome = "stopped" if signal_name == "SIGINT" else "preempted"
                describe = lambda path: f"received {signal_name} at step {step}: saved {path}. {resume_hint}"  # noqa: E731
                break
        else:
            if not (cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0):
                with self._phase(f"the final validation after step {step}"):
                    self.evaluate(step)  # unless the interval just ran it
            describe = lambda path: (  # noqa: E731
                f"done: {cfg.train.steps} steps. Run directory {run_dir}: checkpoint {path}, metrics "
                f"{run_dir / 'metrics.jsonl'}, TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
            )
        # the one exit path: save (unless this step was just saved), publish the state, say where things are
        with self._phase(f"saving the checkpoint of step {step}"):
            path = self.save(step)
        write_status(run_dir, outcome, step)
        _say(describe(path))
        return 0

    def close(self) -> None:
        if self.owns_preemption and self.preemption is not None:
            self.preemption.restore()
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            self.engine.destroy()
        if self.lock is not None:
            self.lock.release()
        stop_runtime()


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: str | None = None,
                 preemption: PreemptionFlag | None = None) -> int:
    return Trainer(cfg, run_dir, resume, preemption).run()
