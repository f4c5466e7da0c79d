"""Synthetic long-context retrieval documents: key -> value needles hidden in a word haystack.

A document is ``BOS + haystack-with-needles + queries + EOS``, exactly the drawn length::

    <bos> lopa rize key QWER is 4821. vuto lopa ... what is QWER? 4821.<eos>

Only the queried values' tokens are answer tokens (mask 1). Every piece is tokenized on its own, so
the mask is exact for any tokenizer. The same generator will make the evaluation tasks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lucid_megatron.atomic import staged_directory
from .shards import ShardWriter, read_manifest, write_manifest
from .tokenizer import ByteTokenizer, load_tokenizer

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
MAX_FILLER_WORDS = len(_SYLLABLES) ** 2
_NEEDLE = (" key ", "{key}", " is ", "{value}", ".")
_QUERY = (" what is ", "{key}", "? ", "{value}", ".")


def filler_word_list(count: int) -> list[str]:
    """``count`` distinct lowercase two-syllable words, the same on every machine and run."""
    if not 1 <= count <= MAX_FILLER_WORDS:
        raise ValueError(f"filler_words={count} is not allowed; allowed: 1..{MAX_FILLER_WORDS}")
    n = len(_SYLLABLES)
    # Stepping by a number coprime to n*n visits every word once, so the first words are varied.
    return [_SYLLABLES[(i * 1129) % (n * n) // n] + _SYLLABLES[(i * 1129) % n] for i in range(count)]


@dataclass
class RetrievalTask:
    min_len: int = 256  # document length in tokens, drawn uniformly from [min_len, max_len]
    max_len: int = 512
    num_needles: int = 4  # key -> value pairs hidden in the haystack
    num_queries: int = 1  # how many of them are asked at the end; the rest are distractors
    key_len: int = 4  # uppercase letters
    value_len: int = 4  # digits
    filler_words: int = 64  # size of the haystack's word list

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalTask.{f.name}={value!r}: must be a positive integer")
        if self.min_len > self.max_len:
            raise ValueError(f"RetrievalTask.min_len={self.min_len} exceeds max_len={self.max_len}")
        if self.num_queries > self.num_needles:
            raise ValueError(f"RetrievalTask.num_queries={self.num_queries} exceeds num_needles={self.num_needles}")
        if 26**self.key_len < self.num_needles:
            raise ValueError(f"RetrievalTask.key_len={self.key_len} allows only {26**self.key_len} distinct keys, "
                             f"fewer than num_needles={self.num_needles}")
        filler_word_list(self.filler_words)
        minimum = self.minimum_length()
        if self.min_len < minimum:
            raise ValueError(f"RetrievalTask.min_len={self.min_len} cannot hold {self.num_needles} needles and "
                             f"{self.num_queries} queries plus BOS/EOS; the minimum is {minimum} byte tokens")

    def minimum_length(self, tokenizer=None) -> int:
        """Tokens taken by BOS, EOS, the needles and the queries (no haystack words).

        Exact for the byte tokenizer (the default). For another tokenizer, keys and values are
        bounded by their longest single-character encoding times their length.
        """
        tokenizer = tokenizer or ByteTokenizer()

        def widest(chars):
            return max(len(tokenizer.encode(c)) for c in chars)

        key = self.key_len * widest("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        value = self.value_len * widest("0123456789")
        fixed = {p: len(tokenizer.encode(p)) for p in _NEEDLE + _QUERY if "{" not in p}
        needle = sum(fixed[p] for p in _NEEDLE if p in fixed) + key + value
        query = sum(fixed[p] for p in _QUERY if p in fixed) + key + value
        return 2 + self.num_needles * needle + self.num_queries * query


def _draw_string(rng, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


def generate_retrieval_document(rng: np.random.Generator, task: RetrievalTask, tokenizer):
    """Return ``(tokens int32, answer_mask uint8, meta)`` for one document; deterministic given ``rng``.

    ``meta["needles"]``: ``(key, value, position of the needle's first token)`` in haystack order;
    ``meta["queries"]``: ``(key, value, position of the answer's first token)`` in asking order.
    """
    length = int(rng.integers(task.min_len, task.max_len + 1))
    keys: list[str] = []
    while len(keys) < task.num_needles:
        key = _draw_string(rng, "ABCDEFGHIJKLMNOPQRSTUVWXYZ", task.key_len)
        if key not in keys:
            keys.append(key)
    values = [_draw_string(rng, "0123456789", task.value_len) for _ in keys]
    asked = [int(i) for i in rng.choice(task.num_needles, size=task.num_queries, replace=False)]

    cache: dict[str, list[int]] = {}

    def encode(text):
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    def pieces(template, i):
        """(tokens, is_answer) pieces of a needle or query about needle ``i``."""
        return [(encode(p.format(key=keys[i], value=values[i])), p == "{value}" and template is _QUERY)
                for p in template]

    needles = [pieces(_NEEDLE, i) for i in range(task.num_needles)]
    queries = [pieces(_QUERY, i) for i in asked]
    fixed = 2 + sum(len(t) for parts in needles + queries for t, _ in parts)
    if fixed > length:
        raise ValueError(f"RetrievalTask.min_len={task.min_len}: a document drawn with {length} tokens needs "
                         f"{fixed} for its needles and queries with tokenizer {tokenizer.name}; raise min_len")

    # Haystack words fill the remaining budget exactly; the last one may be cut short.
    words = filler_word_list(task.filler_words)
    filler, budget = [], length - fixed
    while budget > 0:
        word = encode(" " + words[int(rng.integers(task.filler_words))])[:budget]
        filler.append(word)
        budget -= len(word)
    gaps = rng.integers(0, len(filler) + 1, size=task.num_needles)  # word boundary before which it goes

    tokens, mask = [tokenizer.bos_id], [0]
    meta = {"length": length, "needles": [], "queries": []}

    def put(parts):
        start = len(tokens)
        answer = None
        for toks, is_answer in parts:
            if is_answer:
                answer = len(tokens)
            tokens.extend(toks)
            mask.extend([int(is_answer)] * len(toks))
        return start, answer

    for gap in range(len(filler) + 1):
        for i in np.flatnonzero(gaps == gap):
            start, _ = put(needles[i])
            meta["needles"].append((keys[i], values[i], start))
        if gap < len(filler):
            put([(filler[gap], False)])
    for i, parts in zip(asked, queries):
        _, answer = put(parts)
        meta["queries"].append((keys[i], values[i], answer))
    tokens.append(tokenizer.eos_id)
    mask.append(0)
    assert len(tokens) == length, (len(tokens), length)
    return np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8), meta


def write_synth_dataset(out_dir, task: RetrievalTask, *, train_docs: int, valid_docs: int, docs_per_shard: int,
                        seed: int, tokenizer):
    """Write a train and a valid split of retrieval documents plus the manifest; returns the Manifest.

    Same arguments -> byte-identical shards: split ``i`` draws from ``default_rng([seed, i])``.
    ``out_dir`` must be absent or empty; it appears only once everything is written.
    """
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    for name, value, low in (("train_docs", train_docs, 1), ("valid_docs", valid_docs, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    needed = task.minimum_length(tokenizer)
    if task.min_len < needed:
        raise ValueError(f"RetrievalTask.min_len={task.min_len} cannot hold the needles and queries with "
                         f"tokenizer {tokenizer.name}; the minimum is {needed}")
    splits = {}
    with staged_directory(out_dir) as staging:
        for index, (split, count) in enumerate((("train", train_docs), ("valid", valid_docs))):
            rng = np.random.default_rng([seed, index])
            with ShardWriter(staging, split, docs_per_shard) as writer:
                for _ in range(count):
                    tokens, mask, _ = generate_retrieval_document(rng, task, tokenizer)
                    writer.add(tokens, mask)
            splits[split] = writer.info
        source = {"command": "lucid data synth", "task": dataclasses.asdict(task), "seed": seed,
                  "train_docs": train_docs, "valid_docs": valid_docs, "docs_per_shard": docs_per_shard}
        write_manifest(staging, tokenizer, True, splits, source)
    return read_manifest(out_dir)


def ensure_synth_dataset(data, say=print) -> bool:
    """Write the synthetic dataset a run's ``data`` section configures (``data.synth``) at ``data.path``, if
    configured and not there yet; True if it wrote it.  Call it from one process only."""
    from .tokenizer import ByteTokenizer

    path = Path(data.path)
    if data.synth is None or (path / "manifest.json").exists():
        return False
    s = data.synth
    say(f"writing the synthetic retrieval dataset to {path} ({s.train_docs} train documents)")
    write_synth_dataset(path, s.task, train_docs=s.train_docs, valid_docs=s.valid_docs,
                        docs_per_shard=s.docs_per_shard, seed=s.seed, tokenizer=ByteTokenizer())
    return True
