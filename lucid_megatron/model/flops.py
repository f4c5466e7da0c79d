"""FLOPs of one training step of our model, from its config and the document lengths of the batch.

A generic ``6 x parameters x tokens`` is wrong for this model twice over: causal attention over packed
documents costs in proportion to the sum of squared document lengths, not to the row length squared, and
every LUCID layer adds its preconditioner, a lower-triangular solve per KV head with an ``exp(kn_i . kn_j)``
kernel (docs/operator.md).  Counted here, per component (a multiply-add is 2 FLOPs):

* ``linear``: the QKV and output projections, the gated MLP's three matrices (per layer), the output layer
  (embedding lookups cost no FLOPs);
* ``softmax_attention``: per query head and document of length L, ``q . k`` and ``p . v'`` for the causal
  pairs ``j <= i``: ``2 (d + dv) L (L + 1) / 2``;
* ``lucid_preconditioner``: per KV head, LUCID layer and document, the kernel entries and their product with
  V' for ``j < i``: ``2 (d + dv) L (L - 1) / 2``.

**Model FLOPs** are forward plus a backward that recomputes nothing: twice the forward for every component
(each forward product has two gradient products).  **Hardware FLOPs** add what our implementation recomputes:
the backward of both attention kinds rebuilds its score or kernel block (``2 d`` per pair, flash-style), and
activation checkpointing runs each layer's forward again.  MFU uses model FLOPs, as Megatron-LM and
torchtitan do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from lucid_megatron.config.model import ModelConfig, parse_lucid_layers

COMPONENTS = ("linear", "softmax_attention", "lucid_preconditioner")


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """FLOPs by component: ``forward``, ``model`` (forward + backward) and ``hardware`` (+ recomputation)."""

    forward: dict[str, float]
    model: dict[str, float]
    hardware: dict[str, float]

    @property
    def model_total(self) -> float:
        return sum(self.model.values())

    @property
    def hardware_total(self) -> float:
        return sum(self.hardware.values())

    def __add__(self, other: "StepFlops") -> "StepFlops":
        def add(a, b):
            return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in COMPONENTS}

        return StepFlops(add(self.forward, other.forward), add(self.model, other.model),
                         add(self.hardware, other.hardware))


def linear_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of every matrix product with a weight, per token (all layers and the output layer)."""
    h, d = cfg.hidden_size, cfg.kv_channels
    qkv = 2 * h * (cfg.num_attention_heads + 2 * cfg.kv_heads) * d
    proj = 2 * cfg.num_attention_heads * d * h
    mlp = 2 * h * (2 * cfg.ffn_hidden_size) + 2 * cfg.ffn_hidden_size * h  # gated: fc1 is two matrices
    return cfg.num_layers * (qkv + proj + mlp) + 2 * h * cfg.padded_vocab_size


def causal_pairs(lengths: Iterable[int], include_diagonal: bool) -> int:
    """Query-key pairs a causal mask keeps, summed over documents (``j <= i``, or ``j < i``)."""
    return sum(n * (n + 1) // 2 if include_diagonal else n * (n - 1) // 2 for n in lengths)


def step_flops(cfg: ModelConfig, document_lengths: Sequence[int], *, activation_checkpointing: bool = False) -> StepFlops:
    """FLOPs of forward + backward over documents of ``document_lengths`` tokens (one or more rows, packed)."""
    tokens = sum(document_lengths)
    d = dv = cfg.kv_channels
    lucid = sum(parse_lucid_layers(cfg.lucid_layers, cfg.num_layers))
    forward = {
        "linear": float(linear_flops_per_token(cfg) * tokens),
        "softmax_attention": float(cfg.num_layers * cfg.num_attention_heads * 2 * (d + dv)
                                   * causal_pairs(document_lengths, include_diagonal=True)),
        "lucid_preconditioner": float(lucid * cfg.kv_heads * 2 * (d + dv)
                                      * causal_pairs(document_lengths, include_diagonal=False)),
    }
    model = {k: 3.0 * v for k, v in forward.items()}
    recomputed = {  # the backward rebuilds the score / kernel block of every pair
        "linear": 0.0,
        "softmax_attention": float(cfg.num_layers * cfg.num_attention_heads * 2 * d
                                   * causal_pairs(document_lengths, include_diagonal=True)),
        "lucid_preconditioner": float(lucid * cfg.kv_heads * 2 * d
                                      * causal_pairs(document_lengths, include_diagonal=False)),
    }
    if activation_checkpointing:  # every layer's forward again (the output layer is not checkpointed)
        layers_linear = forward["linear"] - 2 * cfg.hidden_size * cfg.padded_vocab_size * tokens
        recomputed = {"linear": layers_linear, "softmax_attention": recomputed["softmax_attention"]
                      + forward["softmax_attention"],
                      "lucid_preconditioner": recomputed["lucid_preconditioner"] + forward["lucid_preconditioner"]}
    hardware = {k: model[k] + recomputed[k] for k in COMPONENTS}
    return StepFlops(forward, model, hardware)


# ---- peak throughput ----------------------------------------------------------------------------------

# Dense (no sparsity) peak FLOP/s by device name, from the vendors' data sheets (SXM parts; a PCIe or NVL
# variant is slower and is listed by its own name).  MFU is left out for any device not listed (and on CPU).
PEAK_FLOPS = {
    # name fragment (lower case): (bf16, fp32 [TF32 tensor cores for fp32 matmuls])
    "h200": (989e12, 494.5e12),
    "h100 nvl": (835e12, 417.5e12),
    "h100 pcie": (756e12, 378e12),
    "h100": (989e12, 494.5e12),
    "a100": (312e12, 156e12),
    "b200": (2250e12, 1125e12),
}


def peak_flops(device_name: str, bf16: bool) -> float | None:
    """Dense peak FLOP/s of ``device_name`` (``torch.cuda.get_device_name()``) for bf16 or fp32, or None."""
    name = device_name.lower()
    for fragment, (peak_bf16, peak_fp32) in PEAK_FLOPS.items():  # longer fragments first where they overlap
        if fragment in name:
            return peak_bf16 if bf16 else peak_fp32
    return None
