"""The Megatron LUCID GPT against an independent plain-PyTorch model with the same weights."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from lucid_megatron.numerics import relative_error

from .common import batch, build, single_process_parallel, tiny_config, weights_of
from .plain_llama import plain_forward, plain_loss


VARIANTS = {
    "rope-untied-all-lucid": {},
    "nope-tied": dict(position_embedding="none", tie_embeddings=True),
    "mixed-every-2": dict(num_layers=4, lucid_layers="every:2"),
    "explicit-list": dict(num_layers=3, lucid_layers=[1, 3]),
    "softmax-only": dict(lucid_layers="none"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_gpt_equals_plain_model(variant):
    cfg = tiny_config(**VARIANTS[variant])
    with single_process_parallel():
        model = build(cfg)
        tokens, labels, positions = batch(cfg.vocab_size, 2, 48)
        logits = model(tokens, positions, None)
        loss = model(tokens, positions, None, labels=labels)
        loss.mean().backward()

        plain_weights = {k: v.detach().clone().requires_grad_() for k, v in weights_of(model).items()}
        want_logits = plain_forward(plain_weights, cfg, tokens, positions)
        want_loss = plain_loss(plain_weights, cfg, tokens, labels, positions)
        want_loss.mean().backward()

    assert logits.shape == (2, 48, cfg.padded_vocab_size)
    assert relative_error(logits, want_logits) < 1e-5
    assert (loss - want_loss).abs().max() < 1e-5
    for name, p in weights_of(model).items():
        assert relative_error(p.grad, plain_weights[name].grad) < 1e-4, name


def test_packed_documents_equal_separate_rows():
    """THD-packed documents give each document the loss it gets alone (RoPE restarts per document)."""
    cfg = tiny_config(num_layers=2, lucid_layers=[2])  # one softmax and one LUCID layer
    lengths = [13, 1, 30, 20]
    with single_process_parallel():
        model = build(cfg)
        tokens, labels, _ = batch(cfg.vocab_size, 1, sum(lengths), seed=3)
        cu = torch.tensor([0, 13, 14, 44, 64], dtype=torch.int32)
        packed = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
            max_seqlen_kv=max(lengths),
        )
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        packed_loss = model(tokens, positions, None, labels=labels, packed_seq_params=packed)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(tokens[:, a:b], positions[:, a:b], None, labels=labels[:, a:b])
            assert (packed_loss[:, a:b] - alone).abs().max() < 1e-5
        want = plain_loss(
            {k: v.detach() for k, v in weights_of(model).items()}, cfg, tokens, labels, positions, cu
        )
    assert (packed_loss - want).abs().max() < 1e-5


def test_activation_checkpointing_changes_nothing():
    """Megatron's full recomputation (train.activation_checkpointing) gives the same loss and gradients."""
    cfg = tiny_config()
    with single_process_parallel():
        plain, recomputed = build(cfg), build(cfg, recompute_activations=True)
        recomputed.load_state_dict(plain.state_dict())
        tokens, labels, positions = batch(cfg.vocab_size, 2, 32)
        losses = []
        for model in (plain, recomputed):
            loss = model(tokens, positions, None, labels=labels).mean()
            loss.backward()
            losses.append(loss)
    assert recomputed.config.recompute_granularity == "full"
    assert torch.equal(losses[0], losses[1])
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad)
