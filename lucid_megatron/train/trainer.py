"""The training loop: one function that composes parallel state, data, model, engine, checkpoints, logs.

Runs in every process of a torchrun (or single-process) job: ``python -m lucid_megatron train ...``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path

import psutil
import torch
import yaml
import torch.distributed as dist
from megatron.core import parallel_state

from lucid_megatron.config.schema import to_dict
from lucid_megatron.config.train import (
    RunLayout,
    TrainConfig,
    check_layout,
    dump_config,
    gradient_accumulation_steps,
    lr_at,
)
from lucid_megatron.data import loader as data_loader
from lucid_megatron.data.shards import read_manifest
from lucid_megatron.data.synth import write_synth_dataset
from lucid_megatron.data.tokenizer import ByteTokenizer
from lucid_megatron.model.gpt import build_gpt_model
from lucid_megatron.parallel.context import split_micro_batch
from lucid_megatron.parallel.state import destroy_parallel, initialize_parallel

from .checkpoint import Checkpointer
from .engine import build_engine, deepspeed_config, evaluate, train_step
from .metrics import MetricsLogger
from .signals import PreemptionFlag


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. the loss stayed non-finite); the message says why."""


def write_status(run_dir: Path, state: str, step: int) -> None:
    """``RUN_DIR/status.json``: running | preempted | stopped | finished | failed (rank 0, atomic).

    Job scripts read it to decide between exiting and requeueing (launch/slurm.sbatch).
    """
    if dist.get_rank() != 0:
        return
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps({"state": state, "step": step, "time": time.time()}))
    os.replace(tmp, run_dir / "status.json")


def _say(text: str) -> None:
    if dist.get_rank() == 0:
        print(f"lucid train: {text}", flush=True)


def _ensure_dataset(cfg: TrainConfig) -> None:
    """Rank 0 writes the synthetic dataset when configured and missing; the others wait."""
    path = Path(cfg.data.path)
    if dist.get_rank() == 0 and not (path / "manifest.json").exists() and cfg.data.synth is not None:
        s = cfg.data.synth
        _say(f"writing the synthetic retrieval dataset to {path} ({s.train_docs} train documents)")
        write_synth_dataset(
            path, s.task, train_docs=s.train_docs, valid_docs=s.valid_docs,
            docs_per_shard=s.docs_per_shard, seed=s.seed, tokenizer=ByteTokenizer(),
        )
    dist.barrier()


def _layout_record(cfg: TrainConfig, layout: RunLayout) -> dict:
    return {
        "world_size": layout.world_size, "tensor_parallel": layout.tensor_parallel,
        "context_parallel": layout.context_parallel, "data_parallel": layout.data_parallel,
        "zero_stage": cfg.train.zero_stage,
    }


def _rows_digest(micro_batches, seq_length: int) -> int:
    """Order-independent fingerprint of the rows of a step (summed over ranks): proves which data ran."""
    total = 0
    for mb in micro_batches:
        for row in mb.tokens.reshape(-1, seq_length):
            total += zlib.crc32(row.numpy().tobytes())
    return total


def _gather_stream_states(local: dict) -> dict:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: str | None = None) -> int:
    run_dir = Path(run_dir)
    layout = check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    initialize_parallel(layout.tensor_parallel, layout.context_parallel, seed=cfg.train.seed)
    engine = None
    preemption = PreemptionFlag()
    try:
        rank = dist.get_rank()
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(cfg))
        _ensure_dataset(cfg)
        manifest = read_manifest(cfg.data.path)
        data_loader.check_layout(manifest, cfg.data.num_streams, layout.data_parallel, cfg.data.num_workers,
                                 cfg.train.global_batch_size)
        if manifest.tokenizer["vocab_size"] > cfg.model.vocab_size:
            raise TrainingStopped(
                f"the dataset's tokenizer has {manifest.tokenizer['vocab_size']} tokens but model.vocab_size "
                f"is {cfg.model.vocab_size}"
            )

        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
        model = build_gpt_model(
            cfg.model, cfg.parallel, attention_backend=cfg.train.attention_backend,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            recompute_activations=cfg.train.activation_checkpointing,
        )
        checkpoints = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last)
        resume_path = None
        if resume == "auto":
            resume_path = checkpoints.latest()
        elif resume:
            resume_path = Path(resume)
        state = {}
        if resume_path is not None:
            _say(f"resuming from {resume_path}")
            Checkpointer.load_weights(resume_path, model)
            state = Checkpointer.read_state(resume_path)
        elif cfg.checkpoint.init_from:
            source = Checkpointer(Path(cfg.checkpoint.init_from)).latest() or Path(cfg.checkpoint.init_from)
            _say(f"initialising weights from {source}")
            Checkpointer.load_weights(source, model)

        grad_accum = gradient_accumulation_steps(cfg, layout)
        engine = build_engine(
            model, lr=cfg.optimizer.lr, betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps,
            weight_decay=cfg.optimizer.weight_decay,
            ds_config=deepspeed_config(
                micro_batch_size=cfg.train.micro_batch_size, grad_accum=grad_accum,
                zero_stage=cfg.train.zero_stage, grad_clip=cfg.optimizer.grad_clip, bf16=bf16,
            ),
        )
        layout_record = _layout_record(cfg, layout)
        if resume_path is not None:
            saved = state.get("layout")
            Checkpointer.load_training_state(
                resume_path, engine, same_layout=saved == layout_record,
                layout_note=f"saved {saved}, now {layout_record}",
            )
        start_step = state.get("step", 0)
        if start_step >= cfg.train.steps:
            _say(f"nothing to do: {resume_path} is at step {start_step} >= train.steps ({cfg.train.steps})")
            write_status(run_dir, "finished", start_step)
            return 0
        write_status(run_dir, "running", start_step)
        nonfinite_total = state.get("nonfinite_steps", 0)
        stream_states = dict(state.get("data", {}))

        dp_rank = parallel_state.get_data_parallel_rank()
        cp_rank = parallel_state.get_context_parallel_rank()

        def this_cp_rank(batches):
            """Every CP rank of a DP group reads the same rows and keeps its zigzag share."""
            if layout.context_parallel == 1:
                return list(batches)
            multiple = layout.tensor_parallel if cfg.parallel.sequence_parallel else 1
            return [split_micro_batch(mb, layout.context_parallel, cp_rank, multiple_of=multiple) for mb in batches]

        loader = data_loader.make_train_loader(
            cfg.data.path, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
            dp_rank=dp_rank, dp_size=layout.data_parallel, num_streams=cfg.data.num_streams,
            num_workers=cfg.data.num_workers, seed=cfg.train.seed, shuffle_shards=cfg.data.shuffle_shards,
            loss_tokens=cfg.data.loss_tokens, on_bad_shard=cfg.data.on_bad_shard, state=stream_states or None,
        )
        metrics = MetricsLogger(
            run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
            total_steps=cfg.train.steps, start_step=start_step,
        )
        metrics.static(start_step, layout_record)
        _say(
            f"{cfg.train.steps} steps from step {start_step}; world {layout.world_size} = DP {layout.data_parallel} "
            f"x CP {layout.context_parallel} x TP {layout.tensor_parallel}, ZeRO-{cfg.train.zero_stage}, "
            f"{grad_accum} micro-batch(es) of {cfg.train.micro_batch_size} x {cfg.train.seq_length} tokens per rank"
        )

        model_yaml = yaml.safe_dump(to_dict(cfg.model), sort_keys=False)

        def save(step: int) -> Path:
            state = {
                "layout": layout_record,
                "data": _gather_stream_states(stream_states),
                "nonfinite_steps": nonfinite_total,
                "tokenizer": manifest.tokenizer,
            }
            return checkpoints.save(step, engine, state, files={"model.yaml": model_yaml})

        def validate(step: int) -> None:
            if cfg.data.eval_rows == 0 or not manifest.splits.get("valid") or not manifest.splits["valid"].shards:
                return
            # A validation split is often a single shard: use as many streams as it has shards.
            eval_streams = max(1, min(cfg.data.num_streams, len(manifest.splits["valid"].shards)))
            batches = data_loader.make_eval_loader(
                cfg.data.path, seq_length=cfg.train.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                dp_rank=dp_rank, dp_size=layout.data_parallel, num_streams=eval_streams,
                max_rows=cfg.data.eval_rows, loss_tokens=cfg.data.loss_tokens,
            )
            loss, _ = evaluate(engine, this_cp_rank(batches))
            metrics.log(step, {"valid_loss": loss})

        consecutive_nonfinite = 0
        last_saved = None
        step = start_step
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            micro_batches = [next(loader) for _ in range(grad_accum)]
            result = train_step(engine, this_cp_rank(micro_batches), lr_at(cfg, step))
            for mb in micro_batches:
                stream_states.update(mb.stream_states)
            digest = torch.tensor([_rows_digest(micro_batches, cfg.train.seq_length)], dtype=torch.int64)
            dist.all_reduce(digest, group=parallel_state.get_data_parallel_group())
            elapsed = time.perf_counter() - started

            if result.nonfinite_micro_batches:
                nonfinite_total += 1
                consecutive_nonfinite += 1
                _say(
                    f"step {step}: non-finite loss in {result.nonfinite_micro_batches}/{len(micro_batches)} "
                    f"micro-batch(es) on some rank; {'step skipped' if result.skipped else 'those dropped'}"
                )
            else:
                consecutive_nonfinite = 0
            if step % cfg.logging.interval == 0 or step == cfg.train.steps or result.nonfinite_micro_batches:
                metrics.log(step, {
                    "loss": result.loss, "lr": lr_at(cfg, step), "grad_norm": result.grad_norm,
                    "tokens": result.tokens,
                    "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_length / elapsed,
                    "step_time_s": elapsed, "memory_gib": _memory_gib(), "nonfinite_steps": nonfinite_total,
                    "skipped": result.skipped, "data_digest": int(digest.item()),
                })
            if consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                write_status(run_dir, "failed", step)
                raise TrainingStopped(
                    f"the loss was non-finite for {consecutive_nonfinite} consecutive steps (up to step {step}); "
                    f"stopping. The last checkpoint is {checkpoints.latest()}. Lower optimizer.lr, keep "
                    "optimizer.grad_clip > 0, or inspect the data of these steps."
                )
            if cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0:
                validate(step)
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
                last_saved = (step, save(step))
            if step == cfg.train.stop_at_step:
                path = last_saved[1] if last_saved and last_saved[0] == step else save(step)
                _say(f"stopping at step {step} (train.stop_at_step): saved {path}; continue with --resume auto")
                write_status(run_dir, "stopped", step)
                metrics.close()
                return 0
            if preemption.agreed():
                path = last_saved[1] if last_saved and last_saved[0] == step else save(step)
                _say(
                    f"received {preemption.received or 'a preemption signal'} at step {step}: saved {path}. "
                    f"Resume with: lucid train <config> --run-dir {run_dir} --resume auto"
                )
                write_status(run_dir, "preempted", step)
                metrics.close()
                return 0

        if not (cfg.logging.eval_interval and step % cfg.logging.eval_interval == 0):
            validate(step)  # the final evaluation, unless the interval just ran it
        path = last_saved[1] if last_saved and last_saved[0] == step else save(step)
        write_status(run_dir, "finished", step)
        metrics.close()
        _say(
            f"done: {cfg.train.steps} steps. Run directory {run_dir}: checkpoint {path}, metrics "
            f"{run_dir / 'metrics.jsonl'}, TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
        )
        return 0
    finally:
        preemption.restore()
        if engine is not None:
            engine.destroy()
        destroy_parallel()
