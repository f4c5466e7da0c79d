"""``lucid demo``: show on a small CPU problem that the LUCID operator is exact and cheap.

Checks the blockwise operator and the decode cache against the dense float64 reference, then
times blockwise LUCID against causal SDPA (forward + backward) side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lucid_megatron import cli_args
from lucid_megatron.memory_estimate import IGNORE_FLAG, MemoryEstimate, check_fits
from lucid_megatron.numerics import relative_error
from lucid_megatron.ops import LucidCache, lucid_attention, lucid_decode_step
from lucid_megatron.timing import median_seconds

MAX_SEQLEN = 32768  # causal SDPA and the blockwise solve on a CPU: far beyond a demo
MAX_HEADS = 256
MAX_HEAD_DIM = 1024


def add_arguments(parser) -> None:
    parser.add_argument("--seqlen", type=cli_args.positive_int(MAX_SEQLEN), default=2048,
                        help="sequence length for the timing")
    parser.add_argument("--heads", type=cli_args.positive_int(MAX_HEADS), default=8)
    parser.add_argument("--kv-heads", type=cli_args.positive_int(MAX_HEADS), default=2)
    parser.add_argument("--head-dim", type=cli_args.positive_int(MAX_HEAD_DIM), default=64)
    parser.add_argument("--seed", type=cli_args.seed(), default=0)
    parser.add_argument(IGNORE_FLAG, action="store_true",
                        help="run even when the memory estimate exceeds the memory available (docs/cli.md)")


def _check_memory(args) -> None:
    """The timed tensors: q, k, v, the output and a gradient of each (x 2), in float32, plus as much again
    for the attention's own buffers."""
    values = args.seqlen * (2 * args.heads + 2 * args.kv_heads) * args.head_dim
    estimate = MemoryEstimate({"attention tensors": values * 4 * 2 * 2})
    check_fits(estimate, what=f"lucid demo with --seqlen {args.seqlen}, {args.heads} heads of {args.head_dim}")


def run(args) -> int:
    if args.heads % args.kv_heads:
        return cli_args.fail("demo", f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} "
                                     "(each KV head serves the same number of query heads)")
    try:
        if not args.ignore_memory_check:
            _check_memory(args)
    except ValueError as err:
        return cli_args.fail("demo", str(err))
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
