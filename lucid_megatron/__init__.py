"""lucid_megatron: pretraining language models with LUCID attention at scale."""

__version__ = "0.1.0"

from .ops import LucidCache, lucid_attention, lucid_decode_step, lucid_precondition

# Registers LucidConfig / LucidForCausalLM with transformers' AutoConfig / AutoModelForCausalLM (after .ops:
# the HF model uses the fast operator when present).  transformers is a dependency; the guard only keeps the
# operator usable on a bare GPU image that was given the package with --no-deps.
try:
    from . import hf  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["LucidCache", "lucid_attention", "lucid_decode_step", "lucid_precondition", "__version__"]
