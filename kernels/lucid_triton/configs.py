"""Launch configurations, and the list of kernel variants the backends can launch (what CI compiles)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

HALF_TYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows per block; 64 lets Hopper use wgmma (its instruction is 64 rows tall)
    block_n: int  # columns per step in the parallel cross kernels
    group: int  # published blocks consumed behind one wait
    num_warps: int
    num_stages: int


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit inputs run on tensor cores with 16-bit operands; anything else takes the exact fp32 path."""
    return dtype if dtype in HALF_TYPES else torch.float32


def padded(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def config_for(dtype: torch.dtype, d: int, dv: int, arch: int = 90) -> KernelConfig:
    """Launch defaults by operand dtype, padded head dims and GPU generation (``arch`` = 80 for A100, 90 for
    H100/H200; others use the nearest lower one).  Chosen as the largest tiles that compile without register
    spills (tests/kernels/test_compile.py checks every one); speed tuning needs a GPU (docs/kernels.md)."""
    widest = max(padded(d), padded(dv))
    if widest > max_head_dim(dtype):
        raise ValueError(f"no Triton config for {dtype} with head dims D={d}, Dv={dv} "
                         f"(up to {max_head_dim(dtype)}); use backend='blockwise'")
    if dtype in HALF_TYPES and arch >= 90:  # wgmma: one warpgroup per 64 rows
        return KernelConfig(block_m=64, block_n=64, group=4, num_warps=4 if widest <= 64 else 8, num_stages=2)
    if dtype in HALF_TYPES:  # mma.sync keeps accumulators in registers: 32-row tiles
        return KernelConfig(block_m=32, block_n=32, group=4, num_warps=8, num_stages=2)
    # fp32 operands (the exact path): scalar FMA products, the smallest tiles; warps as compiled without
    # spills (ptxas's register budget moves with the warp count: 4 spilled at D = 32 on sm_90, 8 on sm_80)
    warps = 4 if widest <= 16 or (widest == 32 and arch < 90) else 8
    return KernelConfig(block_m=16, block_n=16, group=4, num_warps=warps, num_stages=2)


def max_head_dim(dtype: torch.dtype) -> int:
    """Widest head the kernels take: 128 with 16-bit operands, 64 on the fp32 path (wider tiles spill)."""
    return 128 if dtype in HALF_TYPES else 64


def device_arch(device: torch.device) -> int:
    """80/90/... of a CUDA device; 90 elsewhere (the interpreter), so CPU tests run the Hopper tiles."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def precision(dtype: torch.dtype) -> tuple[str, str]:
    """(off-diagonal products, diagonal inverse and its application) input precision for fp32 operands.

    16-bit operands ignore the first.  The diagonal is fp32 data in every variant; 16-bit variants multiply it
    as TF32 on tensor cores (10-bit mantissa: 8x finer than the bf16 rounding every stored V' block gets;
    3xTF32 would spill registers), the exact path as IEEE fp32.
    """
    if dtype in HALF_TYPES:
        return "tf32", "tf32"
    return "ieee", "ieee"


KERNELS = ("diagonal_inverse", "forward", "backward_solve", "backward_keys", "cross_subtract", "cross_backward_cols",
           "cross_backward_rows")
"""Every kernel the backend launches (solve.py: the first four, cross.py: the rest)."""

def compiled_variants(arch: int | None = None) -> list[tuple[torch.dtype, int, int]]:
    """(dtype, D, arch) of every variant the solver can launch, for each kernel: each operand dtype at each tile
    width it takes (D = 16, 32, 64, 128: the kernels' tile is the next power of two, and the host pads rows
    to a multiple of 16, so these are all the shapes a launch can have), on sm_80 and sm_90a; plus D = 80
    (a padded D = 68: masks inside a 128-wide tile)."""
    rows = []
    for target in (80, 90) if arch is None else (arch,):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            rows += [(dtype, d, target) for d in (16, 32, 64, 128) if d <= max_head_dim(dtype)]
        rows.append((torch.bfloat16, 80, target))
    return rows
