"""Multi-query associative recall (MQAR) and its key-update variant, as token-level documents.

The layout of the Zoology study of efficient language models: keys and values are single tokens from two
disjoint id ranges (keys ``0..key_vocab-1``, values ``key_vocab..key_vocab+value_vocab-1``); a document
first lists its key-value pairs, then asks every key once, in a random order, each query followed by its
answer::

    <bos> k3 v17 k9 v2 k1 v40 ... | k9 v2 k1 v40 k3 v17 ... <eos>         (mqar: updates=1)
    <bos> k3 v17 k9 v2 k3 v5  ... | k3 v5 k9 v2 ...         <eos>         (key update: updates=3)

Only the answers (the value after a query) are answer tokens (mask 1), so ``data.loss_tokens: answer``
trains on recall alone.  In the key-update variant (``updates > 1``) each key is assigned between 1 and
``updates`` times (uniformly), each time with a value different from its previous one, the assignments of
all keys interleaved at random; the answer is the key's **latest** value.  That is the case LUCID's
preconditioner is built for: a repeated key's preconditioned value is the new value minus the old one.

``lucid data synth --task mqar`` writes it as ordinary shards; ``lucid eval mqar`` scores a model on the
same generator at other numbers of pairs, by the number of times the queried key was assigned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass
class MqarTask:
    min_pairs: int = 4  # distinct keys of a training document, drawn uniformly from [min_pairs, max_pairs]
    max_pairs: int = 8
    key_vocab: int = 64  # keys are token ids 0..key_vocab-1
    value_vocab: int = 64  # values are token ids key_vocab..key_vocab+value_vocab-1
    updates: int = 1  # most assignments of one key (>1: the key-update task; the answer is the latest value)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MqarTask.{f.name}={value!r}: must be a positive integer")
        if self.min_pairs > self.max_pairs:
            raise ValueError(f"MqarTask.min_pairs={self.min_pairs} exceeds max_pairs={self.max_pairs}")
        if self.max_pairs > self.key_vocab:
            raise ValueError(f"MqarTask.max_pairs={self.max_pairs} needs as many distinct keys; key_vocab="
                             f"{self.key_vocab} has fewer")
        if self.updates > 1 and self.value_vocab < 2:
            raise ValueError(f"MqarTask.updates={self.updates} needs values that can change; value_vocab="
                             f"{self.value_vocab} allows only one value")

    def check_tokenizer(self, tokenizer) -> None:
        """Keys and values must be ordinary ids of ``tokenizer``, none of its special ones."""
        top = self.key_vocab + self.value_vocab
        special = sorted({i for i in (getattr(tokenizer, name, None) for name in ("bos_id", "eos_id", "pad_id"))
                          if i is not None})
        clash = [i for i in special if i < top]
        if top > tokenizer.vocab_size or clash:
            raise ValueError(f"MqarTask: key_vocab + value_vocab = {top} token ids (0..{top - 1}) must be ordinary "
                             f"ids of tokenizer {tokenizer.name} (vocabulary {tokenizer.vocab_size}, special ids "
                             f"{special})")

    def max_length(self, pairs: int | None = None) -> int:
        """Tokens of the longest document with ``pairs`` keys (default ``max_pairs``)."""
        pairs = self.max_pairs if pairs is None else pairs
        return 2 + 2 * pairs * self.updates + 2 * pairs


def generate_mqar_document(rng: np.random.Generator, task: MqarTask, tokenizer, pairs: int | None = None):
    """Return ``(tokens int32, answer_mask uint8, meta)`` for one document; deterministic given ``rng``.

    ``pairs`` fixes the number of keys (evaluation); by default it is drawn from the task's range.
    ``meta["queries"]``: ``(key id, latest value id, answer position, times the key was assigned)`` in
    asking order.
    """
    if pairs is None:
        pairs = int(rng.integers(task.min_pairs, task.max_pairs + 1))
    elif not 1 <= pairs <= task.key_vocab:
        raise ValueError(f"pairs={pairs}: allowed 1..key_vocab={task.key_vocab}")
    keys = rng.choice(task.key_vocab, size=pairs, replace=False)
    counts = rng.integers(1, task.updates + 1, size=pairs)
    # every key's values in assignment order, each different from the one before it
    histories = []
    for count in counts:
        history = [int(rng.integers(task.value_vocab))]
        while len(history) < count:
            step = int(rng.integers(1, task.value_vocab))  # a nonzero shift: never the previous value
            history.append((history[-1] + step) % task.value_vocab)
        histories.append(history)
    order = rng.permutation(np.repeat(np.arange(pairs), counts))  # the assignments of all keys, interleaved
    asked = rng.permutation(pairs)

    tokens, mask = [tokenizer.bos_id], [0]
    written = [0] * pairs
    for i in order.tolist():
        tokens += [int(keys[i]), task.key_vocab + histories[i][written[i]]]
        written[i] += 1
    queries = []
    for i in asked.tolist():
        value = task.key_vocab + histories[i][-1]
        tokens += [int(keys[i]), value]
        queries.append((int(keys[i]), value, len(tokens) - 1, int(counts[i])))
        mask += [0] * (len(tokens) - len(mask) - 1) + [1]
    tokens.append(tokenizer.eos_id)
    mask += [0] * (len(tokens) - len(mask))
    return (np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8),
            {"length": len(tokens), "pairs": pairs, "assignments": int(counts.sum()), "queries": queries})
