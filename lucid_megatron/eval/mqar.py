"""Multi-query associative recall (and key update) scored by number of key-value pairs.

Documents come from the training data's own generator (``data/mqar.py``) with exactly the requested number
of keys, deterministically from the seed.  A query is correct when the model's greedy next-token prediction
after the queried key is its (latest) value; the answer loss is the mean cross-entropy of the answer tokens.
Every query is also counted under the number of times its key was assigned (1 for plain MQAR), which is
how key update is broken down.
"""

from __future__ import annotations

import numpy as np

from lucid_megatron.data.mqar import MqarTask, generate_mqar_document
from lucid_megatron.data.tokenizer import ByteTokenizer


def make_documents(task: MqarTask, pairs: int, count: int, seed: int, tokenizer=None):
    """``count`` documents with ``pairs`` keys each: (tokens, answer mask, meta) triples."""
    tokenizer = tokenizer or ByteTokenizer()
    rng = np.random.default_rng([seed, pairs])
    return [generate_mqar_document(rng, task, tokenizer, pairs=pairs) for _ in range(count)]


def _rates(hits: float, count: float, loss: float) -> dict:
    return {"exact_match": hits / count, "answer_loss": loss / count, "queries": int(count)}


def evaluate(scorer, task: MqarTask, pairs: list[int], *, num_samples: int, seed: int, batch_size: int,
             tokenizer=None) -> dict:
    """{pairs: {exact_match, answer_loss, queries, by_updates: {times assigned: {exact_match, answer_loss,
    queries}}}} for one model (answers are single tokens, so exact match is token accuracy)."""
    results = {}
    for n in pairs:
        docs = make_documents(task, n, num_samples, seed, tokenizer)
        by_updates: dict[int, np.ndarray] = {}  # times assigned -> [correct, queries, summed loss]
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            scored = scorer.next_token_scores([tokens for tokens, _, _ in chunk])
            for (predictions, losses), (tokens, _, meta) in zip(scored, chunk):
                for _, value, position, times in meta["queries"]:
                    # position p - 1 predicts token p
                    row = by_updates.setdefault(times, np.zeros(3))
                    row += (float(predictions[position - 1] == value), 1.0, float(losses[position - 1]))
        hits, count, loss = sum(by_updates.values()).tolist()
        results[n] = {**_rates(hits, count, loss),
                      "by_updates": {times: _rates(*row.tolist()) for times, row in sorted(by_updates.items())}}
    return results


def plot(results: dict, path, title: str) -> None:
    """Exact match vs number of pairs, one line per model (a PNG)."""
    from lucid_megatron.eval.niah import plot as plot_by_point

    plot_by_point(results, path, title, xlabel="key-value pairs per document")
