"""lucid_megatron: pretraining language models with LUCID attention at scale."""

__version__ = "0.1.0"

from .ops import LucidCache, lucid_attention, lucid_decode_step, lucid_precondition

# Nothing here touches transformers: the Hugging Face classes register with its Auto classes when
# ``lucid_megatron.hf`` is imported (by conversion and evaluation, or by a user who wants them).

__all__ = ["LucidCache", "lucid_attention", "lucid_decode_step", "lucid_precondition", "__version__"]
