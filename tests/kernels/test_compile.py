"""Every kernel variant the Triton solver can launch, compiled for A100 (sm_80) and H100/H200 (sm_90a) on
this CPU machine (Triton ships ptxas), and read back: tensor cores, no register spills, shared memory fits.

A regression to scalar fp32 products, to tiles too short for Hopper's wgmma, or to a kernel that spills
fails here, without a GPU.  The compile runs in a subprocess: interpreted kernels (TRITON_INTERPRET=1, set
for the other kernel tests) cannot be compiled.
"""

import json

import pytest

from tests import background

pytest.importorskip("triton", reason="Triton is an optional extra: pip install '.[triton]'")


@pytest.fixture(scope="module")
def compiled():
    """Both generations compiled side by side (two processes: the compiler is single-threaded), started with the
    session in the background (tests/background.py)."""
    work = background.job("compile").result()
    return [row for arch in (80, 90) for row in json.loads((work / f"sm{arch}.json").read_text())]


def test_every_variant_compiles(compiled):
    from lucid_triton.configs import KERNELS, compiled_variants

    assert len(compiled) == len(KERNELS) * len(compiled_variants())


def test_no_register_spills_and_shared_memory_fits(compiled):
    bad = [(r["kernel"], r["dtype"], r["d"], r["arch"], r["regs"], r["spill_bytes"], r["shared"]) for r in compiled
           if r["spill_bytes"] > 0 or r["shared"] > r["shared_limit"] or r["regs"] > 255]
    assert bad == [], "kernel, dtype, D, arch, registers, spilled bytes, shared bytes"


def test_16_bit_variants_use_tensor_cores_with_16_bit_operands(compiled):
    for r in compiled:
        if r["dtype"] == "float32":
            continue
        where = (r["kernel"], r["dtype"], r["d"], r["arch"])
        if r["arch"] == "sm_90":
            assert r["wgmma_16bit"] > 0 and r["mma"] == 0, where  # Hopper: warpgroup MMA, never the old mma.sync
        else:
            assert r["mma_16bit"] > 0, where


def test_main_loops_are_pipelined(compiled):
    """Loads of the next block are issued asynchronously (cp.async) while the current one multiplies; the
    diagonal pre-pass has no loop.  Needs 16-element-aligned rows (D % 16 == 0), as real launches have."""
    for r in compiled:
        if r["kernel"] != "diagonal_inverse" and r["d"] % 16 == 0:
            assert r["cp_async"] > 0, (r["kernel"], r["dtype"], r["d"], r["arch"])


def test_scalar_fp32_work_stays_small_on_16_bit_variants(compiled):
    """exp, masks and scaling are scalar by nature (tens of instructions); a product falling back to scalar
    FMAs shows up as thousands (the fp32 path has 1000-5000)."""
    for r in compiled:
        if r["dtype"] != "float32":
            assert r["scalar_fma"] < 200, (r["kernel"], r["dtype"], r["d"], r["arch"], r["scalar_fma"])
