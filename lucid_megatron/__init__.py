"""lucid_megatron: pretraining language models with LUCID attention at scale."""

__version__ = "0.1.0"

from .ops import LucidCache, lucid_attention, lucid_decode_step, lucid_precondition

__all__ = ["LucidCache", "lucid_attention", "lucid_decode_step", "lucid_precondition", "__version__"]
