"""The LUCID operator: dense reference, blockwise autograd, decode cache."""

from .attention import lucid_attention, lucid_precondition, softmax_attention
from .decode import LucidCache, lucid_decode_step

__all__ = [
    "lucid_attention", "lucid_precondition", "softmax_attention", "LucidCache", "lucid_decode_step",
]
