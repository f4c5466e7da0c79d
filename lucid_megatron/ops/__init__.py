"""The LUCID operator: dense reference, blockwise autograd, decode cache."""

from .attention import lucid_attention, lucid_precondition
from .decode import LucidCache, lucid_decode_step

__all__ = ["lucid_attention", "lucid_precondition", "LucidCache", "lucid_decode_step"]
