"""Compile the kernels for a GPU on a machine without one, and read what the compiler made of them.

Triton ships ptxas, so ``triton.compile`` can target sm_80 (A100) or sm_90a (H100/H200) anywhere; the PTX and
the cubin's metadata (registers, spills, shared memory) are the real ones.  Used by the CI test that keeps the
kernels on tensor cores, and by ``python -m lucid_triton.compile_check`` for a table.  Needs ``TRITON_INTERPRET``
unset in the process (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import cross, solve
from .configs import KERNELS, compiled_variants, config_for, operand_dtype, padded, precision

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block an A100 / H100-H200 SM can give
CONSTEXPRS = ("BM", "BN", "BD", "BDV", "LOG2_BM", "GROUP", "PRECISION", "DIAG_PRECISION")
TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _signature(kernel, dtype: torch.dtype) -> tuple[object, dict[str, str]]:
    """(jit function, {arg: type}) for one kernel; pointer element types as the host side passes them."""
    op = TRITON_TYPE[operand_dtype(dtype)]
    io = TRITON_TYPE[dtype]  # V and the upstream gradient arrive in the caller's dtype
    fn = {
        "forward": solve.forward_kernel, "backward_solve": solve.backward_solve_kernel,
        "backward_keys": solve.backward_keys_kernel, "diagonal_inverse": solve.diagonal_inverse_kernel,
        "cross_subtract": cross.subtract_kernel,
        "cross_backward_cols": cross.backward_cols_kernel, "cross_backward_rows": cross.backward_rows_kernel,
    }[kernel]
    pointers = {
        "forward": dict(KN=op, V=io, VP=op, INV="fp32", FLAGS="i32", COUNTER="i32", TABLE="i32"),
        "backward_solve": dict(KN=op, GRAD=io, DV_OUT=op, INV="fp32", FLAGS="i32", COUNTER="i32", TABLE="i32"),
        "diagonal_inverse": dict(KN=op, INV="fp32", TABLE="i32"),
        "backward_keys": dict(KN=op, VP=op, DV=op, DKN="fp32", TABLE="i32"),
        "cross_subtract": dict(ACC="fp32", ROWS_KN=op, COLS_KN=op, COLS_VP=op),
        "cross_backward_cols": dict(ACC="fp32", DKN="fp32", COLS_KN=op, COLS_VP=op, ROWS_KN=op, ROWS_DV=op),
        "cross_backward_rows": dict(DKN="fp32", ROWS_KN=op, ROWS_DV=op, COLS_KN=op, COLS_VP=op),
    }[kernel]
    floats = {"scale", "scale_log2", "offset_log2"}
    signature = {}
    for name in fn.arg_names:
        if name in pointers:
            signature[name] = "*" + pointers[name]
        elif name in CONSTEXPRS:
            signature[name] = "constexpr"
        else:
            signature[name] = "fp32" if name in floats else "i32"
    return fn, signature


def _divisible_by_16(name: str, signature: dict[str, str], d: int, dv: int) -> bool:
    """What a real launch specialises: torch's pointers are 16-byte aligned; an int argument divisible by
    16 is marked so (rows are D or Dv elements long, so the strides are multiples of them)."""
    if signature[name].startswith("*"):
        return True
    if name.startswith("stride_") or name in ("D", "DV", "DV_DIM"):
        return d % 16 == 0 and dv % 16 == 0
    return False


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) from the cubin; stack > 0 means spilled registers."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report: {report!r}")
    return int(found.group(1)), int(found.group(2))


def compile_variant(kernel: str, dtype: torch.dtype, d: int, dv: int, arch: int, **overrides) -> dict:
    """Compile one launchable variant for ``sm_{arch}`` (90 means sm_90a) and count what matters.

    ``overrides`` replace config fields or constexprs (tuning experiments); the defaults are what launches.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature = _signature(kernel, dtype)
    op = operand_dtype(dtype)
    cfg = config_for(op, d, dv, arch)
    products, diagonal = precision(op)
    constants = dict(BM=cfg.block_m, BN=cfg.block_n, BD=padded(d), BDV=padded(dv), PRECISION=products,
                     DIAG_PRECISION=diagonal, LOG2_BM=int(math.log2(cfg.block_m)), GROUP=cfg.group)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    for key, value in overrides.items():
        (options if key in options else constants)[key] = value
    if "BM" in overrides:
        constants["LOG2_BM"] = int(math.log2(overrides["BM"]))
    constexprs = {(fn.arg_names.index(k),): v for k, v in constants.items() if k in signature}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and _divisible_by_16(name, signature, d, dv)}
    started = time.monotonic()
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs, stack = _resource_usage(compiled.asm["cubin"])
    return {
        "kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "d": d, "dv": dv, "arch": f"sm_{arch}",
        "block_m": constants["BM"], "num_warps": options["num_warps"], "num_stages": options["num_stages"],
        "mma": len(re.findall(r"\bmma\.sync\b", ptx)), "wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "wgmma_16bit": len(re.findall(r"wgmma\.mma_async\.\S+\.(?:bf16|f16)\.(?:bf16|f16)", ptx)),
        "mma_16bit": len(re.findall(r"mma\.sync\.\S+\.(?:bf16|f16)\.(?:bf16|f16)", ptx)),
        "scalar_fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)), "cp_async": len(re.findall(r"\bcp\.async\b", ptx)),
        "regs": regs, "spill_bytes": stack, "shared": compiled.metadata.shared, "shared_limit": SHARED_MEMORY_LIMIT[arch],
        "seconds": round(time.monotonic() - started, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile every launchable LUCID kernel variant for sm_80/sm_90a")
    p.add_argument("--json", help="write the results here as a JSON list")
    p.add_argument("--arch", type=int, choices=(80, 90), help="one GPU generation only (default: both)")
    args = p.parse_args(argv)
    rows = []
    for dtype, d, arch in compiled_variants(args.arch):
        for kernel in KERNELS:
            rows.append(compile_variant(kernel, dtype, d, d, arch))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
