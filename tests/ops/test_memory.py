"""Blockwise LUCID forward+backward is memory-linear: measured with the process's peak RSS."""

import json
import subprocess
import sys
import textwrap

MIB = 1 << 20

# Runs in a fresh interpreter and reads the kernel's resident-memory high-water mark (VmHWM), reset
# through /proc/self/clear_refs right before the measured region, so nothing earlier (imports,
# warm-up) can hide it.  A 1 GiB control allocation checks that the probe sees touched memory.
PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from lucid_megatron.ops import lucid_attention
    from lucid_megatron.timing import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    torch.manual_seed(0)
    n, d = int(sys.argv[1]), int(sys.argv[2])

    # Warm up kernels and thread pools on a tiny problem.
    small = [torch.randn(1, 64, 1, d, requires_grad=True) for _ in range(3)]
    lucid_attention(*small, backend="blockwise").sum().backward()

    q, k, v = (torch.randn(1, n, 1, d, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, n, 1, d)
    reset_peak_rss()
    inputs = current_rss_bytes()
    out = lucid_attention(q, k, v, backend="blockwise")
    out.backward(grad_out)
    after = peak_rss_bytes()
    reset_peak_rss()
    settled = current_rss_bytes()
    control = torch.ones(256 * 1024 * 1024)  # 1 GiB, touched
    control_peak = peak_rss_bytes()
    print(json.dumps(dict(inputs=inputs, after=after, settled=settled, control_peak=control_peak,
                          finite=bool(torch.isfinite(k.grad).all()))))
    """
)


def test_blockwise_forward_backward_memory_is_linear():
    n, d = 16384, 64
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(n), str(d)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    m = json.loads(result.stdout.strip().splitlines()[-1])
    assert m["finite"]
    # The probe is live: a touched 1 GiB tensor raises the peak by about 1 GiB.
    assert m["control_peak"] - m["settled"] > 900 * MIB
    added = m["after"] - m["inputs"]
    dense_matrix = n * n * 4
    assert dense_matrix == 1024 * MIB
    assert added < 256 * MIB, f"forward+backward added {added / MIB:.0f} MiB over its inputs"
