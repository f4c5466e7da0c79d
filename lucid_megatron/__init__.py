"""lucid_megatron: pretraining language models with LUCID attention at scale."""

import importlib

__version__ = "0.1.0"

# The operator's names load on first use, so that `lucid` commands (`lucid train --help` first) start
# without importing torch. Nothing here touches transformers: the Hugging Face classes register with its
# Auto classes when ``lucid_megatron.hf`` is imported (by conversion and evaluation, or by a user who wants them).
_FROM_OPS = ("LucidCache", "lucid_attention", "lucid_decode_step", "lucid_precondition")

__all__ = [*_FROM_OPS, "__version__"]


def __getattr__(name):
    if name in _FROM_OPS:
        return getattr(importlib.import_module(".ops", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
