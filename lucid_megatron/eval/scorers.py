"""Next-token predictions and losses from a Megatron checkpoint or a Hugging Face directory.

Documents are scored independently (packed as THD documents for Megatron, equal-length rows for Hugging
Face), so results do not depend on how they are batched.  A Megatron checkpoint can be evaluated at any
tensor/context-parallel layout (the format reshards): every rank runs the same calls, predictions are gathered
over the vocabulary (TP) and the sequence (CP), and every rank gets the full result.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lucid_megatron.parallel.plan import CpCommType


def _pack(docs: list[np.ndarray]):
    """Documents -> one packed THD micro-batch (labels/weights for the loss of each next token)."""
    from lucid_megatron.data.loader import MicroBatch

    tokens = torch.from_numpy(np.concatenate(docs).astype(np.int64))[None]
    labels = torch.cat([torch.from_numpy(np.append(d[1:], 0).astype(np.int64)) for d in docs])[None]
    weights = torch.cat([torch.cat([torch.ones(len(d) - 1), torch.zeros(1)]) for d in docs])[None]
    bounds = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return MicroBatch(tokens=tokens, labels=labels, loss_weight=weights,
                      position_ids=torch.cat([torch.arange(len(d)) for d in docs])[None],
                      cu_seqlens=torch.tensor(bounds, dtype=torch.int32), max_seqlen=max(len(d) for d in docs),
                      num_rows=len(docs), stream_states={})


def _next_token_losses(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of each position's label, 0 where the weight is 0 (a document's last token)."""
    losses = torch.nn.functional.cross_entropy(logits, labels.to(logits.device), reduction="none")
    return torch.where(weights.to(logits.device) > 0, losses, torch.zeros_like(losses))


@contextlib.contextmanager
def _read_on_every_rank(checkpoint: str | Path):
    """Yield the checkpoint ``checkpoint`` resolves to, the same on every rank, held against the rotation of a
    run still training (``lucid_megatron.checkpoint.reading``): rank 0 resolves and holds it first, so a save
    in between cannot give the ranks different steps; then each rank holds that one."""
    from lucid_megatron.checkpoint import reading

    with contextlib.ExitStack() as held:
        chosen = [None]
        if dist.get_rank() == 0:
            try:
                chosen = [str(held.enter_context(reading(checkpoint)))]
            except OSError as err:  # the other ranks must not wait for a name that never comes
                chosen = [err]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(chosen, src=0)
        if isinstance(chosen[0], OSError):
            raise chosen[0]
        if dist.get_rank() != 0:
            held.enter_context(reading(chosen[0]))
        yield Path(chosen[0])


def _load_weights(checkpoint, model) -> None:
    from lucid_megatron.checkpoint import Checkpointer
    from lucid_megatron.checkpoint.load_errors import load_errors_explained

    with load_errors_explained(checkpoint):
        Checkpointer.load_weights(checkpoint, model)


class MegatronScorer:
    """A checkpoint at tensor-parallel size ``tp`` and context-parallel size ``cp`` (world = tp x cp).

    The model and the batches live on the runtime's device (the GPU of this rank when there is one);
    results come back to the host.
    """

    def __init__(self, checkpoint: str | Path, *, tp: int = 1, cp: int = 1, cp_comm_type: CpCommType = "p2p"):
        from lucid_megatron.config import ParallelConfig
        from lucid_megatron.checkpoint import Checkpointer, read_model_config
        from lucid_megatron.runtime import Runtime, start_runtime
        from lucid_megatron.runtime.parallelize import build_model, portable_model_config

        self.owns_parallel_state = not dist.is_initialized()
        self.runtime = (start_runtime(tp, cp, cp_comm_type=cp_comm_type) if self.owns_parallel_state
                        else Runtime.current(cp_comm_type=cp_comm_type))
        self.tp, self.cp = tp, cp
        try:
            if dist.get_world_size() != tp * cp:
                raise ValueError(f"evaluation runs on tp x cp = {tp * cp} processes, got a world of "
                                 f"{dist.get_world_size()}")
            parallel = ParallelConfig(tensor_parallel_size=tp, context_parallel_size=cp, cp_comm_type=cp_comm_type)
            with _read_on_every_rank(checkpoint) as self.checkpoint:  # held until the weights are in memory
                self.cfg = portable_model_config(read_model_config(self.checkpoint))
                self.model = build_model(self.runtime, self.cfg, parallel, initialize=False,
                                         load=lambda model: _load_weights(self.checkpoint, model))
        except BaseException:
            self.close()  # the caller gets no scorer to close
            raise
        self.model.eval()

    def _local(self, batch):
        """This rank's share of ``batch`` on the device and, per local token, its index in the unpadded batch
        (-1: padding), also on the device (under CP the plan's index map, made with the split)."""
        local = self.runtime.micro_batch(batch)
        if self.cp == 1:
            return local, torch.arange(batch.tokens.shape[1], device=self.runtime.device)
        return local, local.plan.source_positions

    def _gather(self, values: torch.Tensor, positions: torch.Tensor, total: int, fill) -> torch.Tensor:
        """Local values at original positions (-1: padding) -> the full sequence on every rank, on the host."""
        if self.cp == 1:
            return values.cpu()
        group = self.runtime.context_parallel_group
        parts_v = [torch.empty_like(values) for _ in range(self.cp)]
        parts_p = [torch.empty_like(positions) for _ in range(self.cp)]
        dist.all_gather(parts_v, values.contiguous(), group=group)
        dist.all_gather(parts_p, positions.contiguous(), group=group)
        out = torch.full((total,), fill, dtype=values.dtype, device=values.device)
        for v, p in zip(parts_v, parts_p):
            keep = p >= 0
            out[p[keep]] = v[keep]
        return out.cpu()

    @torch.no_grad()
    def next_token_scores(self, docs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: the greedy prediction at every position and the loss (nats) of the actual next
        token there (0 at the last position), both on the host.  Loss and prediction are over the tokenizer's
        vocabulary (the padding rows of the output layer left out), as in a Hugging Face export of the model."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        from lucid_megatron.runtime.placement import packed_seq_params

        batch = _pack(docs)
        local, positions = self._local(batch)
        logits = self.model(local.tokens, local.position_ids, None, packed_seq_params=packed_seq_params(local))
        # Only real tokens compete: the export drops the padding rows, and both scorers must agree.
        logits = gather_from_tensor_model_parallel_region(logits)[0][:, : self.cfg.vocab_size].float()
        losses = _next_token_losses(logits, local.labels[0], local.loss_weight[0])
        total = batch.tokens.shape[1]
        predictions = self._gather(logits.argmax(-1), positions, total, -1).numpy()
        losses = self._gather(losses, positions, total, 0.0).numpy()
        bounds = batch.cu_seqlens.tolist()
        return [(predictions[a:b], losses[a:b]) for a, b in zip(bounds, bounds[1:])]

    @torch.no_grad()
    def token_losses(self, batch):
        """(loss, weight, position in document) of every token of a packed micro-batch, full sequence, host."""
        from lucid_megatron.runtime.placement import packed_seq_params

        local, positions = self._local(batch)
        loss = self.model(local.tokens, local.position_ids, None, labels=local.labels,
                          packed_seq_params=packed_seq_params(local))[0].float()
        total = batch.tokens.shape[1]
        return (self._gather(loss, positions, total, 0.0), batch.loss_weight[0],
                batch.position_ids[0])

    def close(self) -> None:
        if self.owns_parallel_state:
            from lucid_megatron.runtime import stop_runtime

            stop_runtime()


class HFScorer:
    """A Hugging Face model directory, one process. Its own code (auto_map) runs only with ``trust_remote_code``;
    LUCID exports load without it, through the classes this package registers."""

    def __init__(self, path: str | Path, *, trust_remote_code: bool = False):
        from lucid_megatron.convert.hf_io import load_hf_model  # LUCID exports load through our registered classes

        self.model = load_hf_model(path, trust_remote_code=trust_remote_code).eval()

    @torch.no_grad()
    def next_token_scores(self, docs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """As :meth:`MegatronScorer.next_token_scores`."""
        by_length: dict[int, list[int]] = {}
        for i, d in enumerate(docs):
            by_length.setdefault(len(d), []).append(i)
        result: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for length, indices in by_length.items():  # equal lengths: no padding needed
            ids = torch.from_numpy(np.stack([docs[i] for i in indices]).astype(np.int64))
            logits = self.model(ids, use_cache=False).logits.float()
            labels = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
            weights = torch.ones(ids.shape, dtype=torch.float32)
            weights[:, -1] = 0.0
            for row, i in enumerate(indices):
                result[i] = (logits[row].argmax(-1).numpy(),
                             _next_token_losses(logits[row], labels[row], weights[row]).numpy())
        return [result[i] for i in range(len(docs))]

    def close(self) -> None:
        pass
