"""``lucid demo``: show on a small CPU problem that the LUCID operator is exact and cheap.

Checks the blockwise operator and the decode cache against the dense float64 reference, then
times blockwise LUCID against causal SDPA (forward + backward) side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lucid_megatron.numerics import relative_error
from lucid_megatron.ops import LucidCache, lucid_attention, lucid_decode_step
from lucid_megatron.timing import median_seconds


def add_arguments(parser) -> None:
    parser.add_argument("--seqlen", type=int, default=2048, help="sequence length for the timing")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    torch.manual_seed(args.seed)
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim

    q, k, v = (torch.randn(2, 257, h, d, dtype=torch.float64) for h in (hq, hkv, hkv))
    ref = lucid_attention(q, k, v, backend="reference")
    fast = lucid_attention(q, k, v, backend="blockwise")
    cache = LucidCache()
    decoded = torch.cat(
        [lucid_decode_step(cache, q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]) for t in range(257)], dim=1
    )
    print(f"exactness (float64, N=257, Hq={hq}, Hkv={hkv}, D={d}), max relative error vs dense reference:")
    print(f"  blockwise prefill  {relative_error(fast, ref):.2e}")
    print(f"  token-by-token     {relative_error(decoded, ref):.2e}")

    n = args.seqlen
    q, k, v = (torch.randn(1, n, h, d, requires_grad=True) for h in (hq, hkv, hkv))

    def lucid_step():
        lucid_attention(q, k, v).sum().backward()

    def sdpa_step():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        out.sum().backward()

    t_lucid, t_sdpa = median_seconds(lucid_step), median_seconds(sdpa_step)
    print(f"forward+backward, float32, N={n}, {torch.get_num_threads()} threads:")
    print(f"  causal SDPA      {1e3 * t_sdpa:8.1f} ms")
    print(f"  LUCID blockwise  {1e3 * t_lucid:8.1f} ms  ({t_lucid / t_sdpa:.2f}x SDPA)")
    return 0
