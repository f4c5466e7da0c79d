"""Why a checkpoint's weights did not load, in one line.

Megatron's distributed checkpoint and torch's reader report a model that does not fit the saved tensors (most
often a ``model.yaml`` edited after training) as a long exception, per rank, with tracebacks inside its text.
This module finds the tensor that does not fit and names it, with the checkpoint.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

# What a weights load raises when the model and the checkpoint disagree; CheckpointException is a BaseException.
LOAD_ERRORS = (CheckpointingException, CheckpointException, KeyError, RuntimeError)

_PATTERNS = (
    # Megatron's global shape check: the checkpoint's tensor, then the model's (sizes as torch.Size or tuples).
    (re.compile(r"Global shape mismatch for loaded \((.+?)\) and expected \((.+?)\) tensor for key (\S+)"),
     lambda saved, wanted, key: f"tensor {key!r} is {_shape(saved)} in the checkpoint but {_shape(wanted)} in the "
                                "model model.yaml describes"),
    # torch's load_state_dict: the checkpoint's tensor, then the model's.
    (re.compile(r"size mismatch for (\S+): copying a param with shape (.+?) from checkpoint, "
                r"the shape in current model is (.+?)\.?$", re.MULTILINE),
     lambda key, saved, wanted: f"tensor {key!r} is {_shape(saved)} in the checkpoint but {_shape(wanted)} in the "
                                "model model.yaml describes"),
    (re.compile(r"'?([\w.]+)'? from model not in state dict"),
     lambda key: f"the model model.yaml describes has tensor {key!r}, the checkpoint does not"),
    (re.compile(r"Missing keys \(for all ranks\): \{'?([\w.]+)"),
     lambda key: f"the checkpoint has tensor {key!r}, the model model.yaml describes does not"),
    (re.compile(r"Unexpected keys \(for this rank\): \{'?([\w.]+)"),
     lambda key: f"the model model.yaml describes has tensor {key!r}, the checkpoint does not"),
    (re.compile(r'Missing key\(s\) in state_dict: "([\w.]+)"'),
     lambda key: f"the model model.yaml describes has tensor {key!r}, the checkpoint does not"),
    (re.compile(r'Unexpected key\(s\) in state_dict: "([\w.]+)"'),
     lambda key: f"the checkpoint has tensor {key!r}, the model model.yaml describes does not"),
)


def _shape(text: str) -> tuple[int, ...]:
    """``torch.Size([2, 352, 64])`` or ``(2, 352, 64)`` -> (2, 352, 64)."""
    return tuple(int(n) for n in re.findall(r"\d+", text))


def _nested(err: BaseException):
    """``err`` and every exception inside it: causes, contexts and the per-rank failures torch collects."""
    seen, queue = set(), [err]
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [current.__cause__, current.__context__]
        if isinstance(current, CheckpointException):
            queue += [failure[0] if isinstance(failure, tuple) else failure for failure in current.failures.values()]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def describe_load_error(err: BaseException, checkpoint) -> str:
    """One line naming the checkpoint and, when it can be read from ``err``, the tensor that does not fit."""
    errors = list(_nested(err))
    for pattern, words in _PATTERNS:
        for candidate in errors:
            found = pattern.search(str(candidate))
            if found:
                return f"{checkpoint}: model.yaml does not match the weights: {words(*found.groups())}"
    # The deepest error that is not torch's wrapper (whose text holds every rank's traceback).
    root = next((e for e in reversed(errors) if not isinstance(e, CheckpointException)), err)
    return f"{checkpoint}: the weights do not load: {type(root).__name__}: {_first_line(root)}"


@contextlib.contextmanager
def load_errors_explained(checkpoint):
    """Around a weights load: what ``LOAD_ERRORS`` raises becomes a ValueError of one line
    (``describe_load_error``)."""
    try:
        yield
    except LOAD_ERRORS as err:
        raise ValueError(describe_load_error(err, Path(checkpoint))) from None
