"""Validation loss and perplexity by position bucket: does the loss keep falling deeper into the context?"""

from __future__ import annotations

import math

from lucid_megatron import atomic


def check_tokenizer(checkpoint, dataset_dir, manifest) -> str | None:
    """Refuses (ValueError, one line naming both) a dataset made with another tokenizer than the checkpoint's:
    its ids would mean other text to the model and the loss would still look like one.  Returns a note instead
    when the checkpoint's state.json records no tokenizer (older checkpoints), so nothing could be compared."""
    from lucid_megatron.checkpoint import read_state, resolve_checkpoint
    from lucid_megatron.data.tokenizer import tokenizer_mismatch

    checkpoint = resolve_checkpoint(checkpoint)
    trained_with = read_state(checkpoint).get("tokenizer")
    if trained_with is None:
        return (f"{checkpoint}/state.json does not record the tokenizer it was trained with (an older checkpoint); "
                f"not checked against the dataset's {manifest.tokenizer.get('name')}")
    problem = tokenizer_mismatch(trained_with, manifest.tokenizer, a_is=f"the checkpoint {checkpoint} was trained with",
                                 b_is=f"the dataset {dataset_dir} was made with")
    if problem:
        raise ValueError(problem)
    return None


def evaluate(scorer, batches, *, bucket_size: int) -> dict:
    """Weighted mean loss overall and per bucket of in-document positions [k*bucket, (k+1)*bucket)."""
    sums, counts = {}, {}
    for batch in batches:
        loss, weight, position = scorer.token_losses(batch)
        bucket = (position // bucket_size).tolist()
        for b, l, w in zip(bucket, (loss * weight).tolist(), weight.tolist()):
            sums[b] = sums.get(b, 0.0) + l
            counts[b] = counts.get(b, 0.0) + w
    total_loss, total_weight = sum(sums.values()), sum(counts.values())
    if total_weight == 0:
        raise ValueError("no scored tokens: the split is empty or every token has loss weight 0")
    buckets = {
        f"{b * bucket_size}-{(b + 1) * bucket_size - 1}": {
            "loss": sums[b] / counts[b], "perplexity": math.exp(sums[b] / counts[b]), "tokens": int(counts[b])}
        for b in sorted(sums) if counts[b] > 0
    }
    mean = total_loss / total_weight
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(total_weight), "by_position": buckets}


def plot(result: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["by_position"])
    starts = [int(label.split("-")[0]) for label in labels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(starts, [result["by_position"][b]["loss"] for b in labels], marker="o")
    ax.set_xlabel("position in document (bucket start)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)
