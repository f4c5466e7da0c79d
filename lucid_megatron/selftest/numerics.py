"""How far bf16 LUCID is from float64, next to how far bf16 softmax (flash) attention is, on the same inputs.

Two kinds of keys: random (the kernel matrix L is mild) and strongly correlated (every key near one shared
direction, so L has large off-diagonal entries and its solve amplifies rounding).  For each, both attentions
run in bf16 with their fast paths (LUCID: the Triton solver, on CPU only under the interpreter) and in float64
on the *same* bf16-rounded inputs; the table holds max-norm relative errors of the output and of the
gradients of q, k and v.  Used by ``lucid selftest gpu`` and by tests/kernels/test_numerics.py.
"""

from __future__ import annotations

import torch

from lucid_megatron.numerics import relative_error

KINDS = ("random", "correlated")


def make_inputs(kind: str, n: int, heads: int, d: int, device, seed: int = 0):
    """q, k, v [1, N, H, D] float64 and an upstream gradient; ``correlated`` keys are u + 0.3 z."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}; allowed: {KINDS}")
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, grad = make(1, n, heads, d), make(1, n, heads, d), make(1, n, heads, d), make(1, n, heads, d)
    if kind == "correlated":
        k = make(1, 1, heads, d) + 0.3 * k
    return [x.to(device) for x in (q, k, v, grad)]


def _errors(fn, inputs, dtype):
    q, k, v, grad = inputs
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*low)
    low_grads = torch.autograd.grad(out, low, grad.to(dtype))
    exact = [x.detach().double().requires_grad_() for x in low]
    want = fn(*exact)
    want_grads = torch.autograd.grad(want, exact, grad.to(dtype).double())
    return {name: relative_error(a, b)
            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *low_grads), (want, *want_grads))}


def error_table(device, n: int = 256, heads: int = 2, d: int = 64, dtype=torch.bfloat16, seed: int = 0) -> list[dict]:
    """Rows {keys, attention, out, dq, dk, dv}: LUCID (Triton solver; float64 side: blockwise) and softmax."""
    from lucid_megatron.ops import lucid_attention, softmax_attention

    def lucid(q, k, v):
        return lucid_attention(q, k, v, backend="triton" if q.dtype != torch.float64 else "blockwise")

    rows = []
    for kind in KINDS:
        inputs = make_inputs(kind, n, heads, d, device, seed)
        for name, fn in (("lucid", lucid), ("softmax", softmax_attention)):
            rows.append({"keys": kind, "attention": name, **_errors(fn, inputs, dtype)})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| keys | attention | out | dq | dk | dv |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keys']} | {r['attention']} | {r['out']:.1e} | {r['dq']:.1e} | {r['dk']:.1e} | {r['dv']:.1e} |")
    return "\n".join(lines)
