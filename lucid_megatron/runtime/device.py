"""The process's device, the parameters' dtype and the layer spec: choices that need neither Megatron nor
DeepSpeed, so the ``lucid train`` launcher checks a config without importing them (seconds per launch).
``placement`` and ``parallelize`` build on these."""

from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "bf16", "fp32")
SPECS = ("local", "te")


def default_device() -> torch.device:
    """This process's accelerator (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def params_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU, fp32 elsewhere; ``bf16`` and ``fp32`` as named."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def check_spec(spec: str) -> None:
    """Refuse ``te`` where Transformer Engine cannot be imported, saying how to get it (no process group needed)."""
    if spec not in SPECS:
        raise ValueError(f"model.spec={spec!r} is not allowed; allowed: {', '.join(SPECS)}")
    if spec != "te":
        return
    from lucid_megatron.model.specs import transformer_engine_import_error  # imports Megatron: only for te

    problem = transformer_engine_import_error()
    if problem is not None:
        raise ValueError(
            "model.spec=te needs Transformer Engine, which cannot be imported here "
            f"({problem}). On a GPU machine with a CUDA build of PyTorch: "
            "pip install --no-build-isolation 'transformer-engine[pytorch]' (or pip install '.[gpu]'); "
            "otherwise use model.spec=local"
        )
