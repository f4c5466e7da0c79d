"""Will it fit? A floor on the memory a command needs, compared with this machine's before any work starts.

The estimate counts the big buffers only, in bytes, float32 throughout (4 bytes a value):

    weights      parameters x 4 / tensor_parallel                      (per model held at once)
    activations  rows x length x (4 x hidden + 2 x ffn) x 4 / context_parallel
    logits       rows x length x padded vocabulary x 4 x LOGIT_COPIES / context_parallel
    documents    documents x length x 5 + length x GENERATION_BYTES_PER_TOKEN

* parameters: embedding and output layer (one matrix when tied) of vocabulary x hidden, and per layer the
  attention's q, k, v, o projections and the gated MLP's three hidden x ffn matrices (norms left out). They
  come from the checkpoint's ``model.yaml`` or the Hugging Face ``config.json``.
* activations: evaluation runs without gradients, so one layer's activations are alive at a time (not
  x layers as in training): the residual stream, attention input/output and q/k/v (4 x hidden) and the
  MLP's two ffn-wide intermediates, per token. Context parallelism splits the tokens.
* logits: every rank gathers the whole vocabulary over tensor parallelism; ``LOGIT_COPIES`` = 3 (the logits,
  their float32 copy or log-softmax, the per-token loss's softmax). ``lucid convert verify`` compares two
  models in float64 (8 bytes): it counts 2 models x 2 x 3.
* documents (``lucid eval niah``, ``lucid data synth``): int32 tokens plus a uint8 answer mask per token of
  every document held at once, and ``GENERATION_BYTES_PER_TOKEN`` for the one document being generated
  (its Python lists of token pieces: a 10^6-token document peaked at 43 bytes a token, the 5 kept included).

Each of ``processes`` on this machine holds its own copy. The sum is compared with the memory available now
(``MemAvailable`` of /proc/meminfo, or a cgroup's limit when lower); on a machine with CUDA the model's
activations and logits live on the GPU and are not counted against the host. It is a floor, not a promise:
a refusal means the command could not have fit; passing does not guarantee that it will.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

FLOAT_BYTES = 4
LOGIT_COPIES = 3
DOCUMENT_BYTES_PER_TOKEN = 5  # int32 token + uint8 answer mask
GENERATION_BYTES_PER_TOKEN = 40
IGNORE_FLAG = "--ignore-memory-check"


class InsufficientMemory(ValueError):
    """The estimate exceeds the memory available; the message names both and the override flag."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn: int
    vocab: int  # as the output layer has it (padded)
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def of_config(cls, cfg) -> ModelShape:
        """From a ``ModelConfig`` (a checkpoint's model.yaml)."""
        return cls(cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.padded_vocab_size,
                   cfg.num_attention_heads, cfg.kv_heads, cfg.kv_channels, bool(cfg.tie_embeddings))

    @classmethod
    def of_hf_config(cls, config: dict) -> ModelShape:
        """From a Hugging Face ``config.json`` (Llama-style names)."""
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(int(config["num_hidden_layers"]), hidden, int(config["intermediate_size"]),
                   int(config["vocab_size"]), heads, int(config.get("num_key_value_heads") or heads),
                   int(config.get("head_dim") or hidden // heads), bool(config.get("tie_word_embeddings", False)))

    @property
    def parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.ffn
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * (attention + mlp)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Named parts in bytes, held by each of ``processes`` on this machine."""

    parts: dict[str, int]
    processes: int = 1

    @property
    def total(self) -> int:
        return sum(self.parts.values()) * self.processes

    def describe(self) -> str:
        terms = " + ".join(f"{name} {human_bytes(size)}" for name, size in self.parts.items() if size)
        copies = f" x {self.processes} processes" if self.processes > 1 else ""
        return f"{terms or 'nothing'}{copies} = {human_bytes(self.total)}"

    def plus(self, other: MemoryEstimate) -> MemoryEstimate:
        """Both estimates' parts (the same processes hold them)."""
        merged = dict(self.parts)
        for name, size in other.parts.items():
            merged[name] = merged.get(name, 0) + size
        return MemoryEstimate(merged, max(self.processes, other.processes))


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def weights_bytes(shape: ModelShape, *, tensor_parallel: int = 1, models: int = 1) -> int:
    return models * shape.parameters * FLOAT_BYTES // tensor_parallel


def forward_bytes(shape: ModelShape, *, rows: int, length: int, context_parallel: int = 1,
                  logit_bytes: int = FLOAT_BYTES, logit_copies: int = LOGIT_COPIES) -> dict[str, int]:
    """Activations and logits of one forward pass of ``rows`` x ``length`` tokens (see the module's formula)."""
    tokens = rows * length // context_parallel
    return {"activations": tokens * (4 * shape.hidden + 2 * shape.ffn) * FLOAT_BYTES,
            "logits": tokens * shape.vocab * logit_bytes * logit_copies}


def documents_bytes(*, documents: int, length: int) -> int:
    """``documents`` generated documents of ``length`` tokens held at once, plus the one being generated."""
    return documents * length * DOCUMENT_BYTES_PER_TOKEN + length * GENERATION_BYTES_PER_TOKEN


# ------------------------------------------------------------------------------------------ the machine


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup") -> int | None:
    """What this cgroup (v2) may still use: memory.max - memory.current; None without a limit."""
    try:
        limit = Path(root, "memory.max").read_text().strip()
        used = int(Path(root, "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes() -> int:
    """Memory this process could still allocate: MemAvailable, or the cgroup's headroom when lower."""
    candidates = [size for size in (_meminfo_available(), _cgroup_headroom()) if size is not None]
    if not candidates:
        import psutil

        candidates.append(psutil.virtual_memory().available)
    return min(candidates)


def check_fits(estimate: MemoryEstimate, *, what: str, available: int | None = None,
               flag: str = IGNORE_FLAG) -> None:
    """Raise InsufficientMemory (one line) when ``estimate`` exceeds the memory available."""
    available = available_bytes() if available is None else available
    if estimate.total > available:
        raise InsufficientMemory(
            f"{what} needs at least {human_bytes(estimate.total)} of memory (estimate: {estimate.describe()}; "
            f"formula in docs/cli.md), more than the {human_bytes(available)} available on this machine; "
            f"use smaller sizes, or pass {flag} if you know better")
