"""The Triton kernels run on CPU only under Triton's interpreter, which must be chosen before they are defined."""

import os

os.environ["TRITON_INTERPRET"] = "1"
