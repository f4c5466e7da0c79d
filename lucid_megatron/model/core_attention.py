"""Megatron-Core ``core_attention`` modules: LUCID, and the softmax baseline on the same code path.

They implement the interface Megatron's ``SelfAttention`` builds and calls (megatron-core 0.16.1):
``__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
softmax_scale=None, cp_comm_type=None, pg_collection=None)`` and
``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
packed_seq_params=None)``.  Inputs are ``[s, b, heads, d]`` (``[t, heads, d]`` for packed THD),
keys/values with the (TP-local) KV-head count, so GQA is native.  The output is
``[s, b, heads * d]`` (``[t, heads * d]`` for THD).  Neither module has parameters: a LUCID
checkpoint is shaped exactly like a Llama one.  With ``context_parallel_size > 1`` the local tokens are
the zigzag share of every document (THD: ``cu_seqlens`` are the padded global boundaries) and attention
runs through ``lucid_megatron.parallel`` (``cp_comm_type`` ``a2a``, ``p2p`` or ``a2a+p2p``).

Both read the boundaries, the zigzag layout and the algorithm from one :class:`AttentionPlan`: the runtime's,
carried by :class:`PackedDocuments`, or for other input (a plain ``PackedSeqParams``, SBHD) one they build
from their config with :meth:`SoftmaxCoreAttention.plan_from_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from lucid_megatron.config.parallel import check_a2a_heads
from lucid_megatron.ops import lucid_attention, softmax_attention
from lucid_megatron.parallel.cp_a2a import a2a_attention
from lucid_megatron.parallel.cp_hybrid import hybrid_attention
from lucid_megatron.parallel.cp_p2p import p2p_attention
from lucid_megatron.parallel.plan import CP_COMM_TYPES, AttentionPlan, build_plan


class SoftmaxCoreAttention(MegatronModule):
    """Causal softmax attention through PyTorch SDPA, with THD packing (the LUCID baseline)."""

    kind = "softmax"

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        cp_sub_chunks: int = 1,
    ):
        super().__init__(config=config)
        self.cp_sub_chunks = cp_sub_chunks  # p2p pipeline units per chunk (a spec param)
        name = type(self).__name__
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        problems = []
        if attn_mask_type != AttnMaskType.causal:
            problems.append(f"attn_mask_type={attn_mask_type.name} (only 'causal' is supported)")
        if attention_type != "self":
            problems.append(f"attention_type={attention_type!r} (only 'self' is supported)")
        if dropout:
            problems.append(f"attention_dropout={dropout} (attention dropout is not implemented; use 0)")
        if config.apply_query_key_layer_scaling:
            problems.append("apply_query_key_layer_scaling=True (not supported)")
        if config.window_size is not None:
            problems.append(f"window_size={config.window_size} (sliding windows are not supported)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            problems.append(f"softmax_type={config.softmax_type!r} (only 'vanilla')")
        self.cp_size = config.context_parallel_size
        self.cp_comm_type = cp_comm_type if isinstance(cp_comm_type, str) else config.cp_comm_type
        if self.cp_size > 1:
            if self.cp_comm_type not in CP_COMM_TYPES:
                problems.append(
                    f"cp_comm_type={self.cp_comm_type!r} with context_parallel_size={self.cp_size} "
                    f"(allowed: {', '.join(CP_COMM_TYPES)})"
                )
            elif self.cp_comm_type in ("a2a", "a2a+p2p"):
                tp = config.tensor_model_parallel_size
                sizes = config.hierarchical_context_parallel_sizes
                two_levels = bool(sizes) and len(sizes) == 2 and sizes[0] * sizes[1] == self.cp_size
                if self.cp_comm_type == "a2a+p2p" and not two_levels:
                    problems.append(f"cp_comm_type='a2a+p2p' needs hierarchical_context_parallel_sizes [a2a group "
                                    f"size, number of groups] multiplying to context_parallel_size "
                                    f"({self.cp_size}), got {sizes}")
                else:
                    a2a_size = self.cp_size if self.cp_comm_type == "a2a" else sizes[0]
                    try:
                        check_a2a_heads(config.num_attention_heads // tp, config.num_query_groups // tp, a2a_size,
                                        self.cp_comm_type)
                    except ValueError as err:
                        problems.append(str(err))
        if problems:
            raise ValueError(f"{name} (layer {layer_number}) cannot be built: " + "; ".join(problems))
        self.layer_number = layer_number
        self.softmax_scale = (
            config.kv_channels**-0.5 if softmax_scale is None else float(softmax_scale)
        )
        self.cp_group = None
        if self.cp_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
        if self.cp_size > 1 and self.cp_comm_type == "a2a+p2p":  # Megatron's: [a2a inside, p2p across]
            self.a2a_group, self.p2p_group = (getattr(pg_collection, "hcp", None)
                                              or parallel_state.get_hierarchical_context_parallel_groups())

    def attend(self, q, k, v, cu_seqlens):
        """``[B, N, H, D]`` flash-attention layout in and out."""
        return softmax_attention(q, k, v, cu_seqlens=cu_seqlens, softmax_scale=self.softmax_scale)

    def context_parallel_options(self) -> dict:
        """What the context-parallel attention functions need to know about this attention."""
        return dict(lucid=False, eps=1e-6, backend="auto")

    def attend_context_parallel(self, q, k, v, plan: AttentionPlan):
        """The same attention with the sequence split over CP ranks (the plan's zigzag layout and algorithm,
        [B, N_local, H, D])."""
        common = dict(scale=self.softmax_scale, **self.context_parallel_options())
        if plan.cp_comm_type == "a2a":
            return a2a_attention(q, k, v, plan.layout, self.cp_group, **common)
        if plan.cp_comm_type == "a2a+p2p":
            return hybrid_attention(q, k, v, plan.layout, self.a2a_group, self.p2p_group,
                                    sub_chunks=self.cp_sub_chunks, **common)
        return p2p_attention(q, k, v, plan.layout, self.cp_group, sub_chunks=self.cp_sub_chunks, **common)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError(
                f"{type(self).__name__} is causal by construction and takes no attention_mask tensor: "
                "pass attention_mask=None, and document boundaries through packed_seq_params (THD)"
            )
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__} does not support attention_bias")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"attn_mask_type={attn_mask_type.name} is not supported; only causal")

        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(
                    f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r} is not supported; use 'thd'"
                )
            plan = self._plan_of(packed_seq_params, query.device)
            # THD: [t, heads, d] -> one packed row [1, t, heads, d].
            out = self._attend_planned(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), plan)
            return out.reshape(out.shape[1], -1)

        # SBHD: [s, b, heads, d] -> [b, s, heads, d]; output back to [s, b, heads * d].  Every row is one
        # document (under CP Megatron's zigzag split of it).
        q, k, v = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self._attend_planned(q, k, v, self.plan_from_config((0, q.shape[1] * self.cp_size), q.device))
        return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)

    def _attend_planned(self, q, k, v, plan: AttentionPlan):
        if plan.layout is None:
            return self.attend(q, k, v, plan.operator_cu_seqlens())
        return self.attend_context_parallel(q, k, v, plan)

    def _plan_of(self, packed_seq_params: PackedSeqParams, device: torch.device) -> AttentionPlan:
        """The runtime's plan, checked against this layer; for a plain ``PackedSeqParams`` one built here
        (its boundaries read back from the device, once per layer call)."""
        plan = packed_seq_params.plan if isinstance(packed_seq_params, PackedDocuments) else None
        if plan is None:
            return self.plan_from_config(_self_attention_cu_seqlens(packed_seq_params).tolist(), device)
        expected = self.cp_comm_type if self.cp_size > 1 else None
        if plan.cp_size != self.cp_size or plan.cp_comm_type != expected:
            raise ValueError(
                f"{type(self).__name__} (layer {self.layer_number}) was built for context_parallel_size="
                f"{self.cp_size}, cp_comm_type={expected!r} (its process groups), but the attention plan of this "
                f"batch says context_parallel_size={plan.cp_size}, cp_comm_type={plan.cp_comm_type!r}: start the "
                "runtime with the model's parallel layout (start_runtime(..., cp_comm_type=parallel.cp_comm_type))"
            )
        return plan

    def plan_from_config(self, cu_seqlens: Sequence[int], device: torch.device) -> AttentionPlan:
        """The plan for input that did not come from the runtime: boundaries ``cu_seqlens`` (under CP the
        padded global row), this layer's CP size, rank and algorithm."""
        rank = torch.distributed.get_rank(self.cp_group) if self.cp_size > 1 else 0
        return build_plan(cu_seqlens, device, cp_size=self.cp_size, cp_rank=rank, cp_comm_type=self.cp_comm_type)


class LucidCoreAttention(SoftmaxCoreAttention):
    """LUCID attention: the softmax baseline with values preconditioned by ``L^{-1}`` (exact, O(N d) memory).

    ``lucid_eps`` (RMS-norm epsilon of the preconditioner keys) and ``backend`` (operator backend)
    come from the layer spec's ``params``.
    """

    kind = "lucid"

    def __init__(self, *args, lucid_eps: float = 1e-6, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.lucid_eps = lucid_eps
        self.backend = backend

    def context_parallel_options(self) -> dict:
        return dict(lucid=True, eps=self.lucid_eps, backend=self.backend)

    def attend(self, q, k, v, cu_seqlens):
        return lucid_attention(
            q, k, v, cu_seqlens=cu_seqlens, eps=self.lucid_eps, softmax_scale=self.softmax_scale,
            backend=self.backend,
        )


@dataclasses.dataclass
class PackedDocuments(PackedSeqParams):
    """Megatron's THD parameters carrying our attention plan.

    Megatron's own code reads ``cu_seqlens_*`` and ``max_seqlen_*`` (filled from the plan: the boundaries on
    the device); the LUCID/softmax core attention reads the plan, whose boundaries are host integers, so a
    layer never copies them back from the device (no device-to-host synchronisation per layer).
    """

    plan: AttentionPlan | None = None

    @classmethod
    def from_plan(cls, plan: AttentionPlan) -> "PackedDocuments":
        cu = plan.cu_seqlens_device
        return cls(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                   cu_seqlens_kv_padded=cu, max_seqlen_q=plan.max_seqlen, max_seqlen_kv=plan.max_seqlen, plan=plan)


def _self_attention_cu_seqlens(packed_seq_params: PackedSeqParams) -> torch.Tensor:
    """Document boundaries of a plain packed self-attention batch (padded boundaries when present)."""
    cu_q = packed_seq_params.cu_seqlens_q_padded
    if cu_q is None:
        cu_q = packed_seq_params.cu_seqlens_q
    cu_kv = packed_seq_params.cu_seqlens_kv_padded
    if cu_kv is None:
        cu_kv = packed_seq_params.cu_seqlens_kv
    if cu_q is None:
        raise ValueError("packed_seq_params (THD) needs cu_seqlens_q")
    if cu_kv is not None and not torch.equal(cu_q, cu_kv):
        raise ValueError("self-attention needs identical query and key/value cu_seqlens")
    return cu_q.to(torch.int32)
