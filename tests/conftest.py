import os

import pytest
import torch

# The kernel tests run Triton under its interpreter (on CPU tensors; TRITON_INTERPRET=0 overrides it).
# Triton reads the setting when it is first imported, and other test modules import it indirectly
# (transformers does), so it is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
