"""Build a Megatron-Core GPTModel (Llama-style: RMSNorm, SwiGLU, RoPE/NoPE, GQA) from the project config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from lucid_megatron.config import ModelConfig, ParallelConfig
from lucid_megatron.config.parallel import check_model_fits

from lucid_megatron.parallel.cpu_shim import apply_cpu_shim
from .rope import apply_llama3_frequencies, gpt_model_rope_args, yarn_config_attributes
from .specs import get_lucid_block_spec, require_transformer_engine


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute_activations: bool = False,
) -> TransformerConfig:
    """Megatron's TransformerConfig for a Llama-style model; fused CUDA-only paths stay off.

    ``recompute_activations`` checkpoints every transformer layer (Megatron's full/uniform
    recomputation): activations are recomputed in the backward instead of stored.
    """
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if recompute_activations
        else {}
    )
    config = TransformerConfig(
        **recompute,
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        cp_comm_type=parallel.cp_comm_type,
        hierarchical_context_parallel_sizes=parallel.hierarchical_context_parallel_sizes,
        # Weights are drawn whole on the CPU and then split, so a seed gives the same model for
        # every TP size (Megatron's GPU init draws per-rank shards from per-rank streams).
        use_cpu_initialization=True,
        perform_initialization=initialize,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    for name, value in yarn_config_attributes(model).items():  # not dataclass fields: Megatron reads them by name
        setattr(config, name, value)
    return config


def build_gpt_model(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    transformer_engine: bool = False,
    attention_backend: str = "auto",
    params_dtype: torch.dtype = torch.float32,
    initialize: bool = True,
    recompute_activations: bool = False,
) -> GPTModel:
    """A GPTModel whose layers use LUCID or softmax core attention per ``model.lucid_layers``.

    Megatron's parallel state must be initialised with the same TP/CP sizes
    (:func:`lucid_megatron.parallel.state.initialize_parallel`).  ``initialize=False`` leaves the
    (lazily allocated) weights uninitialised, e.g. to count parameters or before loading a
    checkpoint; ``transformer_engine`` selects the TE spec (GPU only).
    """
    parallel = parallel or ParallelConfig()
    check_model_fits(model, parallel)
    if transformer_engine:
        require_transformer_engine("transformer_engine=True")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("initialise the parallel state first (lucid_megatron.parallel.state.initialize_parallel)")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )
    wanted = (parallel.tensor_parallel_size, parallel.context_parallel_size)
    if actual != wanted:
        raise ValueError(f"parallel state has (TP, CP) = {actual} but the config asks for {wanted}")
    apply_cpu_shim()
    config = transformer_config(
        model, parallel, params_dtype=params_dtype, initialize=initialize,
        recompute_activations=recompute_activations,
    )
    spec = get_lucid_block_spec(
        model.layer_is_lucid(), transformer_engine=transformer_engine, lucid_eps=model.lucid_eps,
        backend=attention_backend, cp_sub_chunks=parallel.cp_sub_chunks,
    )
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_seq_len,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        **gpt_model_rope_args(model),
    )
    apply_llama3_frequencies(gpt, model)
    return gpt
