"""Triton tests: on a machine without CUDA the kernels run on the CPU interpreter.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is
created; the kernel modules are imported lazily by the ops, so setting it here
(at collection) is early enough. With a GPU the same small tests run compiled on
CUDA tensors, and ``pytest -m gpu`` adds the full-vocabulary tests.
"""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]
