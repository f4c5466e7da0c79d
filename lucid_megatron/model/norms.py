"""RMSNorm / LayerNorm modules that work with Megatron's sequence parallelism.

Megatron-core's local ``WrappedTorchNorm`` refuses ``sequence_parallel``.  Under sequence
parallelism each tensor-parallel rank normalises a different slice of the sequence, so the gradient
of the (replicated) norm weight is a partial sum on every rank.  These modules sum it over the TP
group inside autograd (Megatron's ``copy_to_tensor_model_parallel_region``: identity forward,
all-reduce backward), so every rank ends up with the full, identical gradient whatever optimizer or
engine (DeepSpeed, plain torch) consumes it.  They therefore do NOT set Megatron's
``param.sequence_parallel`` flag: Megatron's own DDP would all-reduce those grads a second time.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region


class Norm(torch.nn.Module):
    """``config.normalization`` in {"RMSNorm", "LayerNorm"}; same constructor as Megatron's norms.

    Statistics are computed in float32; the state dict holds ``weight`` (and ``bias`` for
    LayerNorm), like ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str | None = None):
        super().__init__()
        kind = config.normalization if normalization is None else normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization={kind!r} is not supported; allowed: 'RMSNorm', 'LayerNorm'")
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("zero_centered_gamma is not supported by lucid_megatron's Norm")
        self.kind = kind
        self.eps = eps
        self.sequence_parallel = bool(config.sequence_parallel)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        if kind == "LayerNorm":
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        else:
            self.register_parameter("bias", None)

    def _sp_reduced(self, param: torch.Tensor | None) -> torch.Tensor | None:
        if param is None or not self.sequence_parallel:
            return param
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return param
        return copy_to_tensor_model_parallel_region(param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._sp_reduced(self.weight), self._sp_reduced(self.bias)
        xf = x.float()
        if self.kind == "RMSNorm":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        else:
            y = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=self.eps)
        y = y.to(x.dtype) * weight
        return y + bias if bias is not None else y
