"""The authors' mechanistic toy: can one attention layer unlearn an attention sink?

One attention layer (vocabulary 10, width 256, one head, no position encoding, a linear MSE head reading the
attention output alone by default, as the authors did) reads a random permutation of the 10 tokens.
Phase 1 trains the identity target (position i -> one-hot of token i); phase 2, continuing from phase 1's
weights, trains the cumulative average (position i -> mean of the one-hots of tokens 0..i).  The paper
reports that softmax attention stays stuck near loss 1.2 in phase 2 while LUCID recovers to ~0.
``attention_stats`` measures how saturated the attention is, so whether softmax gets stuck is measured,
not assumed.  Both attentions are this package's operators (``softmax_attention`` and ``lucid_attention``),
on identical weights, data and optimizer.
"""

from __future__ import annotations

import dataclasses

import torch

from lucid_megatron import atomic
from lucid_megatron.ops import lucid_attention, softmax_attention


@dataclasses.dataclass
class ToyConfig:
    vocab: int = 10
    width: int = 256
    phase_steps: int = 30000  # optimizer steps per phase (the authors')
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    residual: bool = False  # False (the authors'): the head reads attention alone; True: x + attention(x)


class OneLayerAttention(torch.nn.Module):
    """Embedding -> one causal attention head (no position encoding), plus the embedding if ``residual`` ->
    linear head."""

    def __init__(self, cfg: ToyConfig, attention: str):
        super().__init__()
        if attention not in ("softmax", "lucid"):
            raise ValueError(f"attention={attention!r}; allowed: 'softmax', 'lucid'")
        self.attention = attention
        self.residual = cfg.residual
        self.embed = torch.nn.Embedding(cfg.vocab, cfg.width)
        self.qkv = torch.nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.head = torch.nn.Linear(cfg.width, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        q, k, v = (t.unsqueeze(2) for t in self.qkv(x).chunk(3, dim=-1))  # [B, N, 1 head, width]
        attend = lucid_attention if self.attention == "lucid" else softmax_attention
        mixed = attend(q, k, v).squeeze(2)
        return self.head(x + mixed if self.residual else mixed)


@torch.no_grad()
def attention_stats(model: OneLayerAttention, tokens: torch.Tensor) -> dict[str, float]:
    """How sharp the attention pattern is on ``tokens`` (means over the batch and positions 1..N-1).

    ``first_token``: weight on position 0 (near 1: an attention sink); ``max_weight``: the largest weight of
    each row (1: one-hot, saturated); ``self_weight``: weight on the row's own position (what the identity
    target rewards without a residual); ``logit_range``: largest minus smallest scaled logit of each row (how
    far into saturation the softmax is: its gradient shrinks like exp(-range)).  LUCID changes the values,
    not the weights, so these mean the same for both attentions.
    """
    q, k, _ = model.qkv(model.embed(tokens)).chunk(3, dim=-1)
    n = tokens.shape[1]
    scores = (q @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)[:, 1:]
    rows = scores[:, 1:]
    allowed = ~future[1:]
    largest = rows.masked_fill(~allowed, float("-inf")).amax(-1)
    smallest = rows.masked_fill(~allowed, float("inf")).amin(-1)
    return {"first_token": float(weights[..., 0].mean()), "max_weight": float(weights.amax(-1).mean()),
            "self_weight": float(weights.diagonal(offset=1, dim1=1, dim2=2).mean()),
            "logit_range": float((largest - smallest).mean())}


def first_token_attention(model: OneLayerAttention, tokens: torch.Tensor) -> float:
    """Mean softmax weight that positions 1.. put on position 0: near 1 when an attention sink has formed."""
    return attention_stats(model, tokens)["first_token"]


def targets(tokens: torch.Tensor, phase: str, vocab: int) -> torch.Tensor:
    """Phase 'identity': one-hot of each token; phase 'cumavg': running mean of the one-hots so far."""
    one_hot = torch.nn.functional.one_hot(tokens, vocab).float()
    if phase == "identity":
        return one_hot
    if phase == "cumavg":
        steps = torch.arange(1, tokens.shape[1] + 1, dtype=torch.float32)[None, :, None]
        return one_hot.cumsum(1) / steps
    raise ValueError(f"phase={phase!r}; allowed: 'identity', 'cumavg'")


def batch(generator: torch.Generator, cfg: ToyConfig) -> torch.Tensor:
    """``batch_size`` random permutations of the vocabulary."""
    return torch.argsort(torch.rand(cfg.batch_size, cfg.vocab, generator=generator), dim=1)


def loss_fn(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the output dimension, averaged over positions and batch."""
    return ((prediction - target) ** 2).sum(-1).mean()


def train_toy(cfg: ToyConfig, attention: str, log_every: int = 10, stats_every: int = 500) -> tuple[dict, dict]:
    """Phase 1 then phase 2 with one Adam optimizer state carried over.

    Returns ``(curves, stats)``: per phase the loss curve [(step, loss)], and per phase the attention
    statistics of :func:`attention_stats` on a held-out batch every ``stats_every`` steps
    (``stats[phase]["trajectory"]``) and after the phase's last step (``stats[phase]["end"]``).
    """
    torch.manual_seed(cfg.seed)
    model = OneLayerAttention(cfg, attention)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    curves, stats = {}, {}
    probe = batch(torch.Generator().manual_seed(10_000 + cfg.seed), cfg)
    for phase in ("identity", "cumavg"):
        curve, trajectory = [], []
        for step in range(cfg.phase_steps):
            if step % stats_every == 0:
                trajectory.append((step, attention_stats(model, probe)))
            tokens = batch(generator, cfg)
            loss = loss_fn(model(tokens), targets(tokens, phase, cfg.vocab))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == cfg.phase_steps - 1:
                curve.append((step, loss.item()))
        curves[phase] = curve
        end = attention_stats(model, probe)
        stats[phase] = {"end": end, "trajectory": trajectory + [(cfg.phase_steps, end)]}
    return curves, stats


def final_loss(curve: list[tuple[int, float]], tail: int = 5) -> float:
    """Mean of the last ``tail`` logged losses (less noisy than the very last one)."""
    values = [loss for _, loss in curve[-tail:]]
    return sum(values) / len(values)


def steps_to_reach(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """First logged step whose loss is below ``threshold`` (None: never)."""
    return next((step for step, loss in curve if loss < threshold), None)


def plot_sharpness(stats: dict, path, title: str) -> None:
    """Largest attention weight and logit range over both phases, one line per attention (and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = {"softmax": "tab:blue", "lucid": "tab:red"}
    for (attention, seed), by_phase in stats.items():
        first = by_phase["identity"]["trajectory"]
        offset = first[-1][0]
        points = first + [(offset + step, s) for step, s in by_phase["cumavg"]["trajectory"]]
        label = attention if seed == min(s for a, s in stats if a == attention) else None
        for ax, key in zip(axes, ("max_weight", "logit_range")):
            ax.plot([step for step, _ in points], [s[key] for _, s in points], color=colors[attention],
                    alpha=0.8, label=label)
            ax.axvline(offset, color="gray", linewidth=0.8, linestyle=":")
    axes[0].set_ylabel("largest attention weight per row")
    axes[1].set_ylabel("logit range per row (max - min)")
    for ax in axes:
        ax.set_xlabel("step (phase 2 starts at the dotted line)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)


def plot(results: dict, path, title: str) -> None:
    """Both phases side by side: one line per attention (and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
    colors = {"softmax": "tab:blue", "lucid": "tab:red"}
    for (attention, seed), curves in results.items():
        for ax, phase in zip(axes, ("identity", "cumavg")):
            steps, losses = zip(*curves[phase])
            ax.plot(steps, losses, color=colors[attention], alpha=0.8,
                    label=attention if seed == min(s for a, s in results if a == attention) else None)
    for ax, phase in zip(axes, ("phase 1: identity", "phase 2: cumulative average")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(phase)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSE loss")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)
