"""Layer specs, layer patterns, Megatron's --spec convention, the softmax baseline, bad layouts."""

import dataclasses

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import import_module

from lucid_megatron.config import ConfigError, ParallelConfig
from lucid_megatron.model.core_attention import LucidCoreAttention, PackedDocuments, SoftmaxCoreAttention
from lucid_megatron.model.gpt import build_gpt_model, transformer_config
from lucid_megatron.model.specs import get_lucid_layer_te_spec, transformer_engine_import_error
from lucid_megatron.numerics import relative_error
from lucid_megatron.parallel.plan import build_plan

from .common import batch, build, single_process_parallel, tiny_config


def _core_attention_kinds(model):
    return [layer.self_attention.core_attention.kind for layer in model.decoder.layers]


@pytest.mark.parametrize(
    "pattern,kinds",
    [
        ("all", ["lucid"] * 4),
        ("none", ["softmax"] * 4),
        ("every:2", ["softmax", "lucid", "softmax", "lucid"]),
        ("every:3", ["softmax", "softmax", "lucid", "softmax"]),
        ([1, 4], ["lucid", "softmax", "softmax", "lucid"]),
    ],
)
def test_layer_pattern(pattern, kinds):
    with single_process_parallel():
        model = build(tiny_config(num_layers=4, lucid_layers=pattern))
    assert _core_attention_kinds(model) == kinds


def test_lucid_adds_no_parameters():
    """A LUCID checkpoint has exactly the keys and shapes of the softmax (Llama) one."""
    with single_process_parallel():
        lucid = build(tiny_config())
        softmax = build(tiny_config(lucid_layers="none"))
    assert list(lucid.decoder.layers[0].self_attention.core_attention.parameters()) == []
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if "_extra_state" not in k}
    assert shapes(lucid) == shapes(softmax)


def test_megatron_spec_convention():
    """`--spec lucid_megatron.model.specs lucid_local_layer_spec` as Megatron-LM resolves it."""
    cfg = tiny_config()
    spec = import_module(("lucid_megatron.model.specs", "lucid_local_layer_spec"))
    with single_process_parallel():
        model = GPTModel(
            config=transformer_config(cfg, ParallelConfig()),
            transformer_layer_spec=spec,
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_seq_len,
            position_embedding_type="rope",
        )
        tokens, labels, positions = batch(cfg.vocab_size, 1, 16)
        loss = model(tokens, positions, None, labels=labels)
    assert _core_attention_kinds(model) == ["lucid"] * cfg.num_layers
    assert torch.isfinite(loss).all()


def test_softmax_pattern_reproduces_plain_megatron_gpt():
    """The softmax baseline is Megatron's own local-spec GPT, up to attention round-off."""
    cfg = tiny_config(lucid_layers="none")
    with single_process_parallel():
        ours = build(cfg)
        plain = GPTModel(
            config=transformer_config(cfg, ParallelConfig()),
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.max_seq_len,
            position_embedding_type="rope",
        )
        plain.load_state_dict(ours.state_dict(), strict=True)
        tokens, labels, positions = batch(cfg.vocab_size, 2, 40)
        ours_loss = ours(tokens, positions, None, labels=labels)
        # Megatron's local attention builds its default causal mask on "cuda": pass it explicitly.
        causal_mask = torch.ones(40, 40, dtype=torch.bool).triu(1)[None, None]
        plain_loss = plain(tokens, positions, causal_mask, labels=labels)
        ours_loss.mean().backward()
        plain_loss.mean().backward()
    assert (ours_loss - plain_loss).abs().max() < 1e-5
    plain_params = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        g = plain_params[name].grad
        assert relative_error(p.grad, g) < 1e-4, name


@pytest.mark.parametrize(
    "overrides,parallel,match",
    [
        (dict(num_attention_heads=4, num_kv_heads=1), dict(tensor_parallel_size=2),
         r"num_kv_heads \(1\) is not divisible by tensor_parallel_size \(2\)"),
        (dict(num_attention_heads=2, num_kv_heads=2, hidden_size=64), dict(tensor_parallel_size=4),
         r"num_attention_heads \(2\) is not divisible by tensor_parallel_size \(4\)"),
        (dict(make_vocab_size_divisible_by=100), dict(tensor_parallel_size=8),
         r"make_vocab_size_divisible_by \(100\) is not divisible by tensor_parallel_size \(8\)"),
        ({}, dict(tensor_parallel_size=2), r"parallel state has \(TP, CP\) = \(1, 1\) but the config asks for \(2, 1\)"),
    ],
)
def test_invalid_layouts_fail_at_build(overrides, parallel, match):
    with single_process_parallel():
        with pytest.raises(ValueError, match=match):
            build_gpt_model(tiny_config(**overrides), ParallelConfig(**parallel))


def test_unknown_pattern_is_refused():
    with pytest.raises(ConfigError, match=r"lucid_layers: unknown pattern 'every-2'"):
        tiny_config(lucid_layers="every-2")
    with pytest.raises(ConfigError, match=r"layer numbers must be distinct and in 1..2, got \[1, 5\]"):
        tiny_config(lucid_layers=[1, 5])


@pytest.mark.skipif(transformer_engine_import_error() is None, reason="checks the error raised without TE")
def test_transformer_engine_spec_without_te_is_a_clear_error():
    with pytest.raises(ImportError, match="Transformer Engine .* Use the local spec"):
        get_lucid_layer_te_spec()
    with single_process_parallel():
        with pytest.raises(ImportError, match="transformer_engine=True needs Transformer Engine"):
            build_gpt_model(tiny_config(), transformer_engine=True)


def test_core_attention_refuses_what_it_cannot_honour():
    cfg = tiny_config()
    with single_process_parallel():
        tc = transformer_config(cfg, ParallelConfig())
        attn = LucidCoreAttention(tc, 1, AttnMaskType.causal, "self")
        q = torch.randn(8, 1, 4, 16)
        kv = torch.randn(8, 1, 2, 16)
        with pytest.raises(ValueError, match="takes no attention_mask tensor"):
            attn(q, kv, kv, torch.ones(1, 1, 8, 8, dtype=torch.bool))
        with pytest.raises(ValueError, match="qkv_format='sbhd' is not supported"):
            attn(q, kv, kv, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
        with pytest.raises(ValueError, match=r"attention_dropout=0.1 \(attention dropout is not implemented"):
            SoftmaxCoreAttention(tc, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
        with pytest.raises(ValueError, match="attn_mask_type=padding"):
            LucidCoreAttention(tc, 1, AttnMaskType.padding, "self")
        # a2a+p2p built straight from a TransformerConfig (no lucid config check in front of it)
        two_level = dict(cp_comm_type="a2a+p2p", context_parallel_size=4)
        with pytest.raises(ValueError, match=r"needs hierarchical_context_parallel_sizes \[a2a group size, number "
                                             r"of groups\] multiplying to context_parallel_size \(4\), got \[3, 2\]"):
            LucidCoreAttention(dataclasses.replace(tc, **two_level, hierarchical_context_parallel_sizes=[3, 2]), 1,
                               AttnMaskType.causal, "self")
        with pytest.raises(ValueError, match=r"heads per TP rank \(4\) must be divisible by the a2a group size, "
                                             r"hierarchical_context_parallel_sizes\[0\] \(3\)"):
            SoftmaxCoreAttention(dataclasses.replace(tc, cp_comm_type="a2a+p2p", context_parallel_size=6,
                                                     hierarchical_context_parallel_sizes=[3, 2]), 1,
                                 AttnMaskType.causal, "self")
        out = attn(q, kv, kv, None)
    assert out.shape == (8, 1, 64)


def test_core_attention_reads_the_runtime_plan_and_refuses_one_for_another_layout():
    """A plan from the runtime gives what the same boundaries give through a plain PackedSeqParams; a plan
    made for context parallelism that this layer was not built for is refused, naming both."""
    with single_process_parallel():
        attn = LucidCoreAttention(transformer_config(tiny_config(), ParallelConfig()), 1, AttnMaskType.causal, "self")
        q, kv = torch.randn(12, 4, 16), torch.randn(12, 2, 16)
        cu = torch.tensor([0, 5, 12], dtype=torch.int32)
        plain = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
        planned = PackedDocuments.from_plan(build_plan([0, 5, 12], torch.device("cpu")))
        assert planned.max_seqlen_q == 7 and torch.equal(planned.cu_seqlens_q, cu)
        assert torch.equal(attn(q, kv, kv, None, packed_seq_params=planned),
                           attn(q, kv, kv, None, packed_seq_params=plain))
        cp_plan = build_plan([0, 12], torch.device("cpu"), cp_size=2, cp_rank=0, cp_comm_type="a2a")
        with pytest.raises(ValueError, match=r"built for context_parallel_size=1, cp_comm_type=None .* plan of this "
                                             r"batch says context_parallel_size=2, cp_comm_type='a2a'"):
            attn(q[:6], kv[:6], kv[:6], None, packed_seq_params=PackedDocuments.from_plan(cp_plan))
