"""The FLOP model (model/flops.py) against PyTorch's FlopCounterMode on the model running on CPU.

FlopCounterMode counts what executes, by operator: the weight products exactly as we do (forward + two backward
products each); PyTorch's fused CPU attention (and the in-place ``baddbmm_``) it does not know, so it is given PyTorch's own
formulas for them: SDPA's
which count each document's full square (the kernel skips the masked half) and a backward that rebuilds the
scores, as our hardware count does: 2L/(L+1) times our causal hardware count.
The blockwise LUCID solve computes its diagonal blocks densely: over our count of the causal pairs it executes
7dL (forward and backward) + 3dLB (the backward's B x B diagonal blocks) more per document of length L
(a multiple of the block size B), KV head and LUCID layer, with d = dv.
"""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

from lucid_megatron.model.flops import peak_flops, step_flops
from lucid_megatron.ops.blockwise import DEFAULT_BLOCK_ROWS

from .common import build, single_process_parallel, tiny_config

aten = torch.ops.aten
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    # the solve accumulates in place; the counter knows only the out-of-place baddbmm
    aten.baddbmm_: lambda acc, a, b, *args, out_shape=None, **kwargs: bmm_flop(a, b),
}


def _counted(cfg, lengths, recompute=False):
    """FLOPs FlopCounterMode saw in one forward + backward, by component."""
    with single_process_parallel():
        model = build(cfg, recompute_activations=recompute)
        n = sum(lengths)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (1, n + 1), generator=g)
        positions = torch.cat([torch.arange(length) for length in lengths])[None]
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
        packed = None if len(lengths) == 1 else PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
            loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:], packed_seq_params=packed)
            loss.float().sum().backward()
    # By operator (its module attribution in the backward is not reliable around Megatron's identity modules):
    # weight products are mm/addmm, the blockwise solve bmm/baddbmm, softmax attention the fused kernel.
    by = {"linear": 0, "softmax": 0, "lucid": 0, "other": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = str(op)
        part = ("linear" if name in ("aten.mm", "aten.addmm") else "lucid" if name in ("aten.bmm", "aten.baddbmm", "aten.baddbmm_")
                else "softmax" if "scaled_dot_product" in name else "other")
        by[part] += flops
    return by, counter.get_total_flops()


MODELS = {"tiny": {},  # 2 layers, width 64, 4 query / 2 KV heads of 16
          "small": dict(num_layers=3, hidden_size=128, num_attention_heads=8, num_kv_heads=2, ffn_hidden_size=352,
                        head_dim=32)}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("lucid_layers", ["all", "every:2", "none"])
@pytest.mark.parametrize("lengths", [[2048], [1024, 768, 256]], ids=["unpacked", "packed"])
def test_the_flop_model_matches_flop_counter_mode(model, lucid_layers, lengths):
    if model == "small" and lucid_layers == "every:2" and len(lengths) == 1:
        recompute = True  # one case with activation checkpointing: the forward runs twice
    else:
        recompute = False
    cfg = tiny_config(lucid_layers=lucid_layers, max_seq_len=2048, **MODELS[model])
    counted, total = _counted(cfg, lengths, recompute)
    ours = step_flops(cfg, lengths, activation_checkpointing=recompute)
    d, block = cfg.kv_channels, DEFAULT_BLOCK_ROWS
    assert all(n % block == 0 for n in lengths)
    assert counted["other"] == 0 and total == sum(counted.values())
    assert counted["linear"] == ours.hardware["linear"]
    assert ours.model["linear"] == 3 * ours.forward["linear"]
    full_squares = sum(step_flops(cfg, [n], activation_checkpointing=recompute).hardware["softmax_attention"]
                       * 2 * n / (n + 1) for n in lengths)
    assert counted["softmax"] == pytest.approx(full_squares, rel=1e-12)
    lucid = {"all": cfg.num_layers, "every:2": cfg.num_layers // 2, "none": 0}[lucid_layers]
    forwards = 2 if recompute else 1  # each forward of the solve runs 2dL beyond the causal pairs, the backward 5dL + 3dLB
    dense_diagonal = lucid * cfg.kv_heads * sum((2 * forwards + 5) * d * n + 3 * d * n * block for n in lengths)
    assert counted["lucid"] == ours.hardware["lucid_preconditioner"] + dense_diagonal
    assert ours.model["lucid_preconditioner"] == 3 * ours.forward["lucid_preconditioner"]
    assert (ours.model["lucid_preconditioner"] == 0) == (lucid == 0)


def test_activation_checkpointing_counts_the_forward_again_as_hardware_flops():
    cfg = tiny_config()
    plain, again = step_flops(cfg, [512, 512]), step_flops(cfg, [512, 512], activation_checkpointing=True)
    assert again.model == plain.model
    output_layer = 2 * cfg.hidden_size * cfg.padded_vocab_size * 1024
    assert again.hardware["linear"] - plain.hardware["linear"] == plain.forward["linear"] - output_layer
    for part in ("softmax_attention", "lucid_preconditioner"):
        assert again.hardware[part] - plain.hardware[part] == plain.forward[part]


@pytest.mark.parametrize("name,bf16,peak", [("NVIDIA H100 80GB HBM3", True, 989e12), ("NVIDIA H200", False, 494.5e12),
                                            ("NVIDIA H100 PCIe", True, 756e12), ("NVIDIA A100-SXM4-80GB", True, 312e12),
                                            ("NVIDIA B200", True, 2250e12), ("Tesla V100", True, None), ("cpu", True, None)])
def test_peak_flops_by_device_name(name, bf16, peak):
    assert peak_flops(name, bf16) == peak
