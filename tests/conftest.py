"""Session-wide test set-up.

Without a CUDA device the Triton kernels run on the CPU interpreter. Triton
decides interpreted-or-compiled when a ``@triton.jit`` function is created,
i.e. when its module is first imported — and any test module (benchmarks,
integrations) may import the kernel modules at collection. So the switch is
set here, in the root conftest, before anything else is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
