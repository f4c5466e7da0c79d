"""The interpreter setting for these tests lives in tests/conftest.py: it must precede Triton's first import."""

import numpy as np
import pytest


@pytest.fixture
def bf16_dot():
    """Make the interpreter's bf16 ``tl.dot`` right: it multiplies the raw uint16 storage of bf16 values.

    The replacement widens bf16 operands to fp32 (exact) and multiplies in fp32: exact products with fp32
    accumulation, which is what tensor cores compute.  Everything else about the bf16 kernels (where values
    are rounded to bf16, what is accumulated in fp32) is the kernels' own code.
    """
    import triton.language as tl
    import triton.runtime.interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar == tl.bfloat16:
            return interp.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    yield
    interp.InterpreterBuilder.create_dot = original
