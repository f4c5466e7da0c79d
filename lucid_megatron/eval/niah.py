"""Needle-in-a-haystack retrieval and key update: key -> value recall at several context lengths.

Documents come from the synthetic training data's own generator (``generate_retrieval_document``), at
exactly each requested length, deterministically from the seed.  A query counts as correct when the model's
greedy next-token prediction is right at every token of its value, given the document up to there (teacher
forcing: the same as greedy decoding of the value, one forward pass per document); the answer loss is the
mean cross-entropy of the value's tokens (the paper's metric).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lucid_megatron import atomic
from lucid_megatron.data.synth import RetrievalTask, generate_retrieval_document
from lucid_megatron.data.tokenizer import ByteTokenizer


def make_documents(task: RetrievalTask, length: int, count: int, seed: int, tokenizer=None):
    """``count`` documents of exactly ``length`` tokens: (tokens, answer mask) pairs."""
    tokenizer = tokenizer or ByteTokenizer()
    exact = dataclasses.replace(task, min_len=length, max_len=length)
    rng = np.random.default_rng([seed, length])
    return [generate_retrieval_document(rng, exact, tokenizer)[:2] for _ in range(count)]


def answer_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of answer tokens (one per query)."""
    spans, start = [], None
    for i, m in enumerate(mask.tolist() + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def score(predictions: np.ndarray, losses: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[queries correct, queries, answer tokens correct, answer tokens, summed answer-token loss] of one
    document (position p - 1 predicts token p, and ``losses[p - 1]`` is the loss of token p)."""
    totals = np.zeros(5, dtype=np.float64)
    for a, b in answer_spans(mask):
        hits = predictions[a - 1 : b - 1] == tokens[a:b]
        totals += (float(hits.all()), 1.0, float(hits.sum()), float(b - a), float(losses[a - 1 : b - 1].sum()))
    return totals


def evaluate(scorer, task: RetrievalTask, lengths: list[int], *, num_samples: int, seed: int,
             batch_size: int, tokenizer=None) -> dict:
    """{length: {exact_match, token_accuracy, answer_loss, queries}} for one model.

    ``answer_loss`` is the mean cross-entropy (nats) of the answer tokens given everything before them.
    """
    results = {}
    for length in lengths:
        docs = make_documents(task, length, num_samples, seed, tokenizer)
        totals = np.zeros(5, dtype=np.float64)
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            scored = scorer.next_token_scores([tokens for tokens, _ in chunk])
            for (predictions, losses), (tokens, mask) in zip(scored, chunk):
                totals += score(predictions, losses, tokens, mask)
        exact, queries, right, count, loss = totals.tolist()
        results[length] = {"exact_match": exact / queries, "token_accuracy": right / count,
                           "answer_loss": loss / count, "queries": int(queries)}
    return results


def plot(results: dict, path, title: str, xlabel: str = "context length (tokens)") -> None:
    """Exact match vs context length (or another evaluation point: ``xlabel``), one line per model (a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_length in results.items():
        points = sorted((int(n), r["exact_match"]) for n, r in by_length.items())  # JSON keys are strings
        ax.plot([n for n, _ in points], [e for _, e in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic.write_figure(path, fig, dpi=120)
    plt.close(fig)
