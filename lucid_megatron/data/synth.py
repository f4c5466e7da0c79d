"""Synthetic long-context retrieval documents: key -> value assignments hidden in a word haystack.

A document is ``BOS + haystack-with-assignments + queries + EOS``, exactly the drawn length::

    <bos> lopa rize key QWER is 4821. vuto lopa ... what is QWER? 4821.<eos>        (template "sentence")
    <bos> lopa Q4 rize B7 vuto Q1 lopa B2 ... ?Q1 ?B2<eos>                            (template "compact")

Two tasks share the generator. *Needle retrieval* (``updates=1``): every key is assigned once.  *Key update*
(``updates>1``): every key is assigned several times with a changing value, and a query asks for the
**latest** value, so a model must overwrite what it stored, not just find a match (the case LUCID's
preconditioner is built for: a repeated key's preconditioned value is the new value minus the old).  Keys
that are never asked and the haystack words are the distractors.

Only the queried values' tokens are answer tokens (mask 1). Every piece is tokenized on its own, so
the mask is exact for any tokenizer. The evaluation (``lucid eval niah``) uses the same generator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
# numpy loads its random module on first use; that first use must not fall inside the staged write below,
# where a SIGTERM raising SystemExit in the middle of an extension module's import is lost (the write went on)
import numpy.random  # noqa: F401

from lucid_megatron.atomic import staged_directory
from .mqar import MqarTask, generate_mqar_document
from .shards import ShardWriter, read_manifest, write_manifest
from .tokenizer import ByteTokenizer, load_tokenizer

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
MAX_FILLER_WORDS = len(_SYLLABLES) ** 2
# (assignment, query) pieces per template; "{value}" in a query is the answer.
TEMPLATES = {
    "sentence": ((" key ", "{key}", " is ", "{value}", "."), (" what is ", "{key}", "? ", "{value}", ".")),
    # A query ends on the key, so the answer is the token that followed the key's latest copy.
    "compact": ((" ", "{key}", "{value}"), (" ?", "{key}", "{value}")),
}
_LETTERS, _DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789"


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
    num_needles: int = 4  # distinct keys in a document
    num_queries: int = 1  # how many of them are asked at the end; the rest are distractors
    key_len: int = 4  # characters of a key, from the first key_vocab uppercase letters
    value_len: int = 4  # characters of a value, from the first value_vocab digits
    filler_words: int = 64  # size of the haystack's word list
    updates: int = 1  # assignments per key (>1: the key-update task; the answer is the latest value)
    key_vocab: int = 26
    value_vocab: int = 10
    template: str = "sentence"  # how assignments and queries are written: one of TEMPLATES

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "template":
                if value not in TEMPLATES:
                    raise ValueError(f"RetrievalTask.template={value!r}; allowed: {sorted(TEMPLATES)}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalTask.{f.name}={value!r}: must be a positive integer")
        if self.min_len > self.max_len:
            raise ValueError(f"RetrievalTask.min_len={self.min_len} exceeds max_len={self.max_len}")
        if self.num_queries > self.num_needles:
            raise ValueError(f"RetrievalTask.num_queries={self.num_queries} exceeds num_needles={self.num_needles}")
        if self.key_vocab > len(_LETTERS) or self.value_vocab > len(_DIGITS):
            raise ValueError(f"RetrievalTask.key_vocab={self.key_vocab}, value_vocab={self.value_vocab}: allowed "
                             f"1..{len(_LETTERS)} letters and 1..{len(_DIGITS)} digits")
        if self.key_vocab**self.key_len < self.num_needles:
            raise ValueError(f"RetrievalTask.key_len={self.key_len} with key_vocab={self.key_vocab} allows only "
                             f"{self.key_vocab**self.key_len} distinct keys, fewer than num_needles={self.num_needles}")
        if self.updates > 1 and self.value_vocab**self.value_len < 2:
            raise ValueError(f"RetrievalTask.updates={self.updates} needs values that can change; value_vocab="
                             f"{self.value_vocab} with value_len={self.value_len} allows only one value")
        filler_word_list(self.filler_words)
        minimum = self.minimum_length()
        if self.min_len < minimum:
            raise ValueError(f"RetrievalTask.min_len={self.min_len} cannot hold {self.num_needles} keys x "
                             f"{self.updates} assignments and {self.num_queries} queries plus BOS/EOS; the minimum "
                             f"is {minimum} byte tokens")

    @property
    def assignments(self) -> int:
        return self.num_needles * self.updates

    def minimum_length(self, tokenizer=None) -> int:
        """Tokens taken by BOS, EOS, the assignments and the queries (no haystack words).

        Exact for the byte tokenizer (the default). For another tokenizer, keys and values are
        bounded by their longest single-character encoding times their length.
        """
        tokenizer = tokenizer or ByteTokenizer()

        def widest(chars):
            return max(len(tokenizer.encode(c)) for c in chars)

        sizes = {"{key}": self.key_len * widest(_LETTERS[: self.key_vocab]),
                 "{value}": self.value_len * widest(_DIGITS[: self.value_vocab])}
        assignment, query = (sum(sizes.get(p) or len(tokenizer.encode(p)) for p in pieces)
                             for pieces in TEMPLATES[self.template])
        return 2 + self.assignments * assignment + self.num_queries * query


def _draw_string(rng, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


def _draw_other(rng, alphabet: str, length: int, previous: str) -> str:
    """A string that differs from ``previous`` (a changed value)."""
    while True:
        value = _draw_string(rng, alphabet, length)
        if value != previous:
            return value


def generate_retrieval_document(rng: np.random.Generator, task: RetrievalTask, tokenizer):
    """Return ``(tokens int32, answer_mask uint8, meta)`` for one document; deterministic given ``rng``.

    ``meta["needles"]``: ``(key, value, position of the assignment's first token)`` in document order;
    ``meta["queries"]``: ``(key, latest value, position of the answer's first token)`` in asking order.
    """
    length = int(rng.integers(task.min_len, task.max_len + 1))
    letters, digits = _LETTERS[: task.key_vocab], _DIGITS[: task.value_vocab]
    keys: list[str] = []
    while len(keys) < task.num_needles:
        key = _draw_string(rng, letters, task.key_len)
        if key not in keys:
            keys.append(key)
    # values[i][u]: the u-th value key i is given, each different from the one before
    values = [[_draw_string(rng, digits, task.value_len)] for _ in keys]
    asked = [int(i) for i in rng.choice(task.num_needles, size=task.num_queries, replace=False)]
    for history in values:
        while len(history) < task.updates:
            history.append(_draw_other(rng, digits, task.value_len, history[-1]))

    cache: dict[str, list[int]] = {}

    def encode(text):
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    assign_template, query_template = TEMPLATES[task.template]

    def pieces(template, key, value):
        """(tokens, is_answer) pieces of an assignment or a query."""
        return [(encode(p.format(key=key, value=value)), p == "{value}" and template is query_template)
                for p in template]

    queries = [pieces(query_template, keys[i], values[i][-1]) for i in asked]
    fixed = 2 + sum(len(t) for parts in queries for t, _ in parts)
    fixed += sum(len(t) for i in range(task.num_needles) for value in values[i]
                 for t, _ in pieces(assign_template, keys[i], value))
    if fixed > length:
        raise ValueError(f"RetrievalTask.min_len={task.min_len}: a document drawn with {length} tokens needs "
                         f"{fixed} for its assignments and queries with tokenizer {tokenizer.name}; raise min_len")

    # Haystack words fill the remaining budget exactly; the last one may be cut short.
    words = filler_word_list(task.filler_words)
    filler, budget = [], length - fixed
    while budget > 0:
        word = encode(" " + words[int(rng.integers(task.filler_words))])[:budget]
        filler.append(word)
        budget -= len(word)
    # Slot a belongs to key a % num_needles and goes before word boundary gaps[a]; a key's assignments take
    # its values in document order, so the last one written is the latest.
    gaps = rng.integers(0, len(filler) + 1, size=task.assignments)

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

    written = [0] * task.num_needles
    for gap in range(len(filler) + 1):
        for slot in np.flatnonzero(gaps == gap):
            i = int(slot) % task.num_needles
            value = values[i][written[i]]
            written[i] += 1
            start, _ = put(pieces(assign_template, keys[i], value))
            meta["needles"].append((keys[i], value, start))
        if gap < len(filler):
            put([(filler[gap], False)])
    for i, parts in zip(asked, queries):
        _, answer = put(parts)
        meta["queries"].append((keys[i], values[i][-1], answer))
    tokens.append(tokenizer.eos_id)
    mask.append(0)
    assert len(tokens) == length, (len(tokens), length)
    return np.asarray(tokens, dtype=np.int32), np.asarray(mask, dtype=np.uint8), meta


def write_synth_dataset(out_dir, task: RetrievalTask | MqarTask, *, train_docs: int, valid_docs: int,
                        docs_per_shard: int, seed: int, tokenizer):
    """Write a train and a valid split of retrieval (or MQAR, see ``mqar.py``) documents plus the manifest;
    returns the Manifest.

    Same arguments -> byte-identical shards: split ``i`` draws from ``default_rng([seed, i])``.
    ``out_dir`` must be absent or empty (anything else is refused before a document is drawn); it appears only
    once everything is written.  Interrupted (an error, Ctrl-C, SIGTERM), it leaves nothing behind.
    """
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    for name, value, low in (("train_docs", train_docs, 1), ("valid_docs", valid_docs, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    if isinstance(task, MqarTask):
        task.check_tokenizer(tokenizer)
        generate, kind = generate_mqar_document, "mqar"
    else:
        needed = task.minimum_length(tokenizer)
        if task.min_len < needed:
            raise ValueError(f"RetrievalTask.min_len={task.min_len} cannot hold the needles and queries with "
                             f"tokenizer {tokenizer.name}; the minimum is {needed}")
        generate, kind = generate_retrieval_document, "retrieval"
    splits = {}
    with staged_directory(out_dir) as staging:
        for index, (split, count) in enumerate((("train", train_docs), ("valid", valid_docs))):
            rng = np.random.default_rng([seed, index])
            with ShardWriter(staging, split, docs_per_shard) as writer:
                for _ in range(count):
                    tokens, mask, _ = generate(rng, task, tokenizer)
                    writer.add(tokens, mask)
            splits[split] = writer.info
        source = {"command": "lucid data synth", "kind": kind, "task": dataclasses.asdict(task), "seed": seed,
                  "train_docs": train_docs, "valid_docs": valid_docs, "docs_per_shard": docs_per_shard}
        write_manifest(staging, tokenizer, True, splits, source)
    return read_manifest(out_dir)


def synth_mismatch(data) -> str | None:
    """Why the synthetic dataset at ``data.path`` is not the one ``data.synth`` configures (None: it is, or
    no ``lucid data synth`` dataset is there)."""
    path = Path(data.path)
    if data.synth is None or not (path / "manifest.json").exists():
        return None
    wanted = dataclasses.asdict(data.synth.mqar or data.synth.task)
    source = read_manifest(path).source or {}
    if source.get("command") == "lucid data synth" and source.get("task") != wanted:
        return (f"data.path {str(path)!r} holds a synthetic dataset of task {source.get('task')}, not the configured "
                f"data.synth {wanted}: give another data.path")
    return None


def ensure_synth_dataset(data, say=print, *, strict: bool = False) -> bool:
    """Write the synthetic dataset a run's ``data`` section configures (``data.synth``) at ``data.path``, if
    configured and not there yet; True if it wrote it.  ``strict``: a dataset already there that ``lucid data
    synth`` wrote for another task is refused (ValueError naming both) instead of used as it is (the
    experiments, whose tasks must not share a dataset).  Call it from one process only."""
    from .tokenizer import ByteTokenizer

    if data.synth is None:  # nothing to write (a mixture, data.sources, has no data.path)
        return False
    path = Path(data.path)
    s = data.synth
    task = s.mqar or s.task
    if (path / "manifest.json").exists():
        mismatch = synth_mismatch(data) if strict else None
        if mismatch:
            raise ValueError(mismatch)
        return False
    say(f"writing the synthetic {'MQAR' if s.mqar else 'retrieval'} dataset to {path} ({s.train_docs} train documents)")
    write_synth_dataset(path, task, train_docs=s.train_docs, valid_docs=s.valid_docs,
                        docs_per_shard=s.docs_per_shard, seed=s.seed, tokenizer=ByteTokenizer())
    return True
