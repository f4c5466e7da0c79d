"""lucid_megatron: pretraining language models with LUCID attention at scale."""

__version__ = "0.1.0"

from .ops import LucidCache, lucid_attention, lucid_decode_step, lucid_precondition

# Registers LucidConfig / LucidForCausalLM with transformers' AutoConfig / AutoModelForCausalLM.
from . import hf  # noqa: E402,F401  (after .ops: the HF model uses the fast operator when present)

__all__ = ["LucidCache", "lucid_attention", "lucid_decode_step", "lucid_precondition", "__version__"]
