"""Tile-level building blocks shared by the LUCID kernels (all ``@triton.jit``, inlined by Triton).

Conventions: a *tile* is ``[BM, BX]`` rows of one head; operands of every product are in the kernel's operand
dtype (bf16/fp16 on GPU, fp32 for the exact path) and every product accumulates in fp32.  Kernel entries
``exp(s kn_r . kn_c - 1/s)`` are evaluated as ``exp2(dot * s * log2(e) - log2(e) / s)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def wait_published(flag_ptr):
    """Spin until another program has published (acquire: its stores are visible after this)."""
    while tl.atomic_add(flag_ptr, 0, sem="acquire") == 0:
        pass
    tl.debug_barrier()  # every thread of this program reads the published data only after the acquire


@triton.jit
def publish(flag_ptr):
    tl.debug_barrier()  # every thread's stores of this block are issued ...
    tl.atomic_xchg(flag_ptr, 1, sem="release")  # ... before the flag says so


@triton.jit
def block_entry(TABLE, blk):
    """(first row, rows, first block of its document, last block of its document) of block ``blk``."""
    entry = TABLE + blk * 4
    return tl.load(entry), tl.load(entry + 1), tl.load(entry + 2), tl.load(entry + 3)


@triton.jit
def load_tile(PTR, g, stride_g, stride_n, row0, offs_m, offs_x, rows_ok, width, CACHE: tl.constexpr):
    """Rows ``row0 + offs_m`` of head ``g``; rows not ok and columns >= width read 0."""
    ptrs = PTR + g * stride_g + (row0 + offs_m)[:, None] * stride_n + offs_x[None, :]
    return tl.load(ptrs, mask=rows_ok[:, None] & (offs_x[None, :] < width), other=0.0, cache_modifier=CACHE)


@triton.jit
def store_tile(PTR, g, stride_g, stride_n, row0, offs_m, offs_x, rows_ok, width, value):
    ptrs = PTR + g * stride_g + (row0 + offs_m)[:, None] * stride_n + offs_x[None, :]
    tl.store(ptrs, value.to(PTR.dtype.element_ty), mask=rows_ok[:, None] & (offs_x[None, :] < width))


@triton.jit
def kernel_tile(kn_rows, kn_cols, scale_log2, offset_log2, PRECISION: tl.constexpr):
    """exp(s kn_r . kn_c - 1/s), fp32 [rows, cols]; every entry is in (0, 1] for normalised keys."""
    return tl.exp2(tl.dot(kn_rows, tl.trans(kn_cols), input_precision=PRECISION) * scale_log2 - offset_log2)


@triton.jit
def unit_lower_inverse(strict_lower, offs_m, LOG2_BM: tl.constexpr, PRECISION: tl.constexpr):
    """``(I + A)^{-1}`` of a strictly lower fp32 tile ``A`` by log2(BM) doublings, two matmuls each.

    With ``T_b`` the inverse of the block-diagonal part of ``I + A`` in blocks of ``b`` rows, and ``C_b`` the
    entries of ``A`` that couple the two halves of each ``2b`` block (lower-left quarter), the inverse of the
    ``2b`` blocks is ``T_2b = T_b - T_b C_b T_b``: the 2x2 block inverse ``[[T11, 0], [-T22 A21 T11, T22]]``
    written with full tiles, so it runs on tensor cores.  It is forward substitution regrouped (same
    products, same error behaviour as a recursive triangular inverse), with no sequential row sweep.
    """
    r = offs_m[:, None]
    c = offs_m[None, :]
    inverse = tl.where(r == c, 1.0, 0.0)
    for level in tl.static_range(LOG2_BM):
        half = 1 << level
        couples = ((r // (2 * half)) == (c // (2 * half))) & ((r // half) % 2 == 1) & ((c // half) % 2 == 0)
        coupling = tl.where(couples, strict_lower, 0.0)
        inverse -= tl.dot(inverse, tl.dot(coupling, inverse, input_precision=PRECISION), input_precision=PRECISION)
    return inverse
