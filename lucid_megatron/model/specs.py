"""Megatron-Core layer specs with LUCID core attention.

Each spec is Megatron's own GPT layer spec with submodules swapped, never a forked layer:
``core_attention`` becomes :class:`LucidCoreAttention` (or :class:`SoftmaxCoreAttention` for softmax
layers of a mixed pattern), and, in the local spec, the norms become the sequence-parallel capable
:class:`Norm`.  Stock Megatron-LM can use the all-LUCID local spec directly::

    pretrain_gpt.py ... --spec lucid_megatron.model.specs lucid_local_layer_spec

(and, on a machine with Transformer Engine, ``lucid_te_layer_spec``).
"""

from __future__ import annotations

import copy
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from .core_attention import LucidCoreAttention, SoftmaxCoreAttention
from .norms import Norm


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None if Transformer Engine can be used here, else why not.

    The one place that decides it, once per process (a failed import is not cached by Python, and TE's
    own import errors can be slow to reach): everything else, specs, model builder and runtime, asks here.
    """
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    except Exception as err:  # ImportError, or TE's own errors without a GPU / cuDNN
        return f"{type(err).__name__}: {err}"
    return None


def require_transformer_engine(needed_by: str) -> None:
    """Raise ImportError naming ``needed_by`` and why Transformer Engine is missing, if it is."""
    problem = transformer_engine_import_error()
    if problem is not None:
        raise ImportError(
            f"{needed_by} needs Transformer Engine on a GPU machine (pip install '.[gpu]'); it cannot be "
            f"imported here ({problem}). Use the local spec (transformer_engine=False) instead."
        )


def core_attention_spec(lucid: bool, *, lucid_eps: float = 1e-6, backend: str = "auto",
                        cp_sub_chunks: int = 1) -> ModuleSpec:
    if lucid:
        params = {"lucid_eps": lucid_eps, "backend": backend, "cp_sub_chunks": cp_sub_chunks}
        return ModuleSpec(module=LucidCoreAttention, params=params)
    return ModuleSpec(module=SoftmaxCoreAttention, params={"cp_sub_chunks": cp_sub_chunks})


def get_lucid_layer_local_spec(lucid: bool = True, *, lucid_eps: float = 1e-6, backend: str = "auto",
                               cp_sub_chunks: int = 1) -> ModuleSpec:
    """Megatron's local GPT layer (RMSNorm, SwiGLU-ready MLP) with LUCID/softmax core attention."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(
        lucid, lucid_eps=lucid_eps, backend=backend, cp_sub_chunks=cp_sub_chunks
    )
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    return spec


def get_lucid_layer_te_spec(lucid: bool = True, *, lucid_eps: float = 1e-6, backend: str = "auto",
                            cp_sub_chunks: int = 1) -> ModuleSpec:
    """Megatron's Transformer Engine GPT layer (fused norm+linear) with LUCID/softmax core attention."""
    require_transformer_engine("the Transformer Engine layer spec")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = copy.deepcopy(get_gpt_layer_with_transformer_engine_spec())
    spec.submodules.self_attention.submodules.core_attention = core_attention_spec(
        lucid, lucid_eps=lucid_eps, backend=backend, cp_sub_chunks=cp_sub_chunks
    )
    return spec


def get_lucid_block_spec(
    layer_is_lucid: list[bool],
    *,
    transformer_engine: bool = False,
    lucid_eps: float = 1e-6,
    backend: str = "auto",
    cp_sub_chunks: int = 1,
) -> TransformerBlockSubmodules:
    """One layer spec per layer (LUCID or softmax, following the pattern) plus the final norm."""
    layer_spec = get_lucid_layer_te_spec if transformer_engine else get_lucid_layer_local_spec
    specs = {
        flag: layer_spec(flag, lucid_eps=lucid_eps, backend=backend, cp_sub_chunks=cp_sub_chunks)
        for flag in set(layer_is_lucid)
    }
    if transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = Norm
    return TransformerBlockSubmodules(layer_specs=[specs[f] for f in layer_is_lucid], layer_norm=final_norm)


# For Megatron-LM's `--spec MODULE NAME`, which imports NAME from MODULE and uses it as the layer spec.
lucid_local_layer_spec = get_lucid_layer_local_spec()
if transformer_engine_import_error() is None:  # GPU machines with Transformer Engine only
    lucid_te_layer_spec = get_lucid_layer_te_spec()
