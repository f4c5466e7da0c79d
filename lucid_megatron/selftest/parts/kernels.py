"""The kernels' numbers against float64: the preconditioner alone, then whole attention next to flash's error."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from .base import Part, Result, passed_if

if TYPE_CHECKING:
    import torch

# relative max error of the Triton preconditioner vs the float64 reference, by input dtype
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
# bf16 LUCID's largest error vs float64 may be at most this many times bf16 flash attention's own (the CPU test,
# tests/kernels/test_numerics.py, holds the kernels to the same bound)
NUMERICS_RATIO = 2.0


@dataclasses.dataclass
class KernelCase:
    case: str
    dtype: str
    out: float  # relative max error of V'
    dk: float
    dv: float
    tolerance: float
    ok: bool


@dataclasses.dataclass(kw_only=True)
class KernelsResult(Result):
    cases: list[KernelCase]

    def markdown(self) -> str:
        lines = ["## a. kernels vs float64 reference (relative max error)", "",
                 "| case | dtype | V' | dK | dV | tolerance | ok |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {c.case} | {c.dtype} | {c.out:.1e} | {c.dk:.1e} | {c.dv:.1e} | {c.tolerance:g} | {c.ok} |"
                  for c in self.cases]
        return "\n".join(lines) + "\n" if self.cases else ""


def check_kernels(device: torch.device, cpu_smoke: bool) -> KernelsResult:
    """Triton preconditioner forward and backward vs the dense reference in float64 on the CPU, which sees the
    same (rounded) inputs."""
    import torch

    from lucid_megatron.numerics import relative_error
    from lucid_megatron.ops import lucid_precondition

    g = torch.Generator().manual_seed(0)
    if cpu_smoke:
        cases, dtypes = [("N=40 D=16", (1, 40, 1, 16, 16), None)], [torch.float32]
    else:
        cases = [("N=300 D=64 Hkv=2", (1, 300, 2, 64, 64), None), ("B=2 N=129 D=68", (2, 129, 1, 68, 68), None),
                 ("packed N=200 D=128", (1, 200, 2, 128, 128), [0, 77, 78, 200]),
                 ("N=2048 D=128 Hkv=4", (1, 2048, 4, 128, 128), None)]
        dtypes = [torch.float32, torch.bfloat16]
    results = []
    for name, (b, n, h, d, dv), cu in cases:
        k64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        v64 = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
        grad = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
        for dtype in dtypes:
            k, v = (x.to(device, dtype).requires_grad_() for x in (k64, v64))
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
            got = lucid_precondition(k, v, cu_seqlens=cu_t, backend="triton")
            got_dk, got_dv = torch.autograd.grad(got, (k, v), grad.to(device, dtype))
            kr, vr = (x.detach().cpu().double().requires_grad_() for x in (k, v))
            want = lucid_precondition(kr, vr, cu_seqlens=None if cu is None else cu_t.cpu(), backend="reference")
            want_dk, want_dv = torch.autograd.grad(want, (kr, vr), grad.to(dtype).double())
            # compared on the device of the kernel's output (the reference is copied there)
            errors = {"out": relative_error(got, want), "dk": relative_error(got_dk, want_dk),
                      "dv": relative_error(got_dv, want_dv)}
            dtype_name = str(dtype).removeprefix("torch.")
            tolerance = TOLERANCE[dtype_name]
            ok = all(math.isfinite(e) and e < tolerance for e in errors.values())
            results.append(KernelCase(case=name, dtype=dtype_name, **errors, tolerance=tolerance, ok=ok))
    return KernelsResult(status=passed_if(all(c.ok for c in results)), cases=results)


@dataclasses.dataclass(kw_only=True)
class NumericsResult(Result):
    rows: list[dict[str, str | float]]  # selftest.numerics.error_table: keys, attention, out, dq, dk, dv
    bound: str

    def markdown(self) -> str:
        from lucid_megatron.selftest.numerics import format_table

        if not self.rows:
            return ""
        return "\n".join(["## a2. bf16 error vs float64: LUCID (Triton) next to softmax (flash), same inputs", "",
                          format_table(self.rows), "", f"bound: {self.bound}"]) + "\n"


def _worst(rows: list[dict[str, str | float]], keys: str, attention: str) -> float:
    return max(float(r[k]) for r in rows if r["keys"] == keys and r["attention"] == attention
               for k in ("out", "dq", "dk", "dv"))


def check_numerics(device: torch.device, cpu_smoke: bool) -> NumericsResult:
    """bf16 LUCID vs bf16 flash attention, each against float64, on random and on correlated keys."""
    import torch

    from lucid_megatron.selftest.numerics import KINDS, error_table

    if cpu_smoke:  # the interpreter's bf16 dot is wrong: fp16 stands in
        rows = error_table(device, n=64, heads=1, d=16, dtype=torch.float16)
    else:
        rows = error_table(device, n=4096, heads=4, d=128)
    ok = all(math.isfinite(_worst(rows, kind, "lucid"))
             and _worst(rows, kind, "lucid") <= NUMERICS_RATIO * _worst(rows, kind, "softmax") for kind in KINDS)
    return NumericsResult(status=passed_if(ok), rows=rows, bound=f"LUCID <= {NUMERICS_RATIO} x flash")


KERNELS = Part("kernels", "Triton preconditioner forward/backward vs the float64 dense reference, fp32 and bf16 "
               "(ragged N, D=68, packed documents, GQA).", lambda ctx: check_kernels(ctx.device, ctx.cpu_smoke))
NUMERICS = Part("numerics", f"bf16 LUCID vs bf16 flash attention, each against float64 on the same inputs, random "
                f"and correlated keys: LUCID within {NUMERICS_RATIO:g}x flash's own error.",
                lambda ctx: check_numerics(ctx.device, ctx.cpu_smoke))
