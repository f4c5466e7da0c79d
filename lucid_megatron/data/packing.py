"""Greedy packing of documents into rows of exactly ``seq_length`` positions.

A document that fits in the row's remaining space is appended; otherwise the row is closed (the
rest is one padding segment) and the document starts the next row. A document longer than
``seq_length`` is cut into ``seq_length`` pieces, each its own segment. Within a segment of tokens
``t``: ``labels[i] = t[i+1]``; the last position's label is ``pad_id`` with weight 0. Positions
restart at 0 in every segment. See docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOSS_MODES = ("all", "answer")


@dataclass
class PackedRow:
    tokens: np.ndarray  # int32 [seq_length]
    labels: np.ndarray  # int32 [seq_length]
    loss_weight: np.ndarray  # float32 [seq_length]
    position_ids: np.ndarray  # int32 [seq_length]
    cu_seqlens: np.ndarray  # int32 [segments + 1]: 0, ..., seq_length (padding is a segment)


class _RowBuilder:
    def __init__(self, seq_length: int, pad_id: int):
        self.tokens = np.full(seq_length, pad_id, dtype=np.int32)
        self.labels = np.full(seq_length, pad_id, dtype=np.int32)
        self.loss_weight = np.zeros(seq_length, dtype=np.float32)
        self.position_ids = np.zeros(seq_length, dtype=np.int32)
        self.bounds = [0]

    @property
    def used(self) -> int:
        return self.bounds[-1]

    @property
    def space(self) -> int:
        return len(self.tokens) - self.used

    def add(self, piece: np.ndarray, weights: np.ndarray) -> None:
        """Append one segment; ``weights[i]`` is the weight of predicting ``piece[i + 1]``."""
        o, n = self.used, len(piece)
        self.tokens[o : o + n] = piece
        self.labels[o : o + n - 1] = piece[1:]
        self.loss_weight[o : o + n - 1] = weights
        self.position_ids[o : o + n] = np.arange(n)
        self.bounds.append(o + n)

    def finish(self) -> PackedRow:
        if self.space:
            self.position_ids[self.used :] = np.arange(self.space)
            self.bounds.append(len(self.tokens))
        return PackedRow(self.tokens, self.labels, self.loss_weight, self.position_ids,
                         np.asarray(self.bounds, dtype=np.int32))


class RowPacker:
    """Packs a document stream into rows and reports, with each row, where the next row starts."""

    def __init__(self, seq_length: int, pad_id: int, loss_tokens: str = "all"):
        if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length={seq_length!r}: must be a positive integer")
        if loss_tokens not in LOSS_MODES:
            raise ValueError(f"loss_tokens={loss_tokens!r} is not allowed; allowed: {', '.join(map(repr, LOSS_MODES))}")
        self.seq_length, self.pad_id, self.loss_tokens = seq_length, pad_id, loss_tokens

    def _weights(self, mask, start: int, count: int) -> np.ndarray:
        if self.loss_tokens == "all":
            return np.ones(count - 1, dtype=np.float32)
        if mask is None:
            raise ValueError("loss_tokens='answer' needs answer masks; this dataset's documents have none")
        # Position i predicts token i + 1: weight it by whether that token is an answer token.
        return mask[start + 1 : start + count].astype(np.float32)

    def pack(self, documents, first_offset: int = 0):
        """Yield ``(PackedRow, next_start)`` for ``documents``, an iterable of ``(where, tokens, mask)``.

        ``next_start`` is ``{**where, "offset": k}`` of the document the next row begins with (``k``
        tokens of it already packed), or None once the documents ran out. Packing resumed from
        there gives exactly the rows that would have followed.
        """
        docs = iter(documents)
        pending, offset = next(docs, None), first_offset
        if offset < 0 or (offset and (pending is None or offset >= len(pending[1]))):
            raise ValueError(f"resume offset {offset} is outside the first document "
                             f"({0 if pending is None else len(pending[1])} tokens)")
        while pending is not None:
            row = _RowBuilder(self.seq_length, self.pad_id)
            while pending is not None:
                _, tokens, mask = pending
                left = len(tokens) - offset
                if 0 < left <= row.space:
                    row.add(tokens[offset:], self._weights(mask, offset, left))
                elif left > 0 and row.used == 0:  # too long for any row: cut a full-row piece
                    row.add(tokens[offset : offset + self.seq_length], self._weights(mask, offset, self.seq_length))
                    offset += self.seq_length
                    break
                elif left > 0:
                    break  # does not fit: close the row, start the next one with this document
                pending, offset = next(docs, None), 0
                if row.space == 0:
                    break
            if row.used:
                # Look one document ahead (done above) so the state names where the next row starts.
                yield row.finish(), (None if pending is None else {**pending[0], "offset": offset})
