"""Triton tests: without CUDA the kernels run on the CPU interpreter.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first
imported (Triton's own ``tl.zeros`` / ``tl.sum`` helpers are ``@jit``
functions created at import). The root ``tests/conftest.py`` sets it; this
file repeats it for runs of ``tests/triton`` alone. With a GPU the small tests
run compiled on CUDA tensors, and ``pytest -m gpu`` adds the full-vocabulary tests.
"""

import importlib.util
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _interpreter_is_usable():
    """Fail loudly (not with an obscure InterpreterError) if triton was imported before the switch."""
    if os.environ.get("TRITON_INTERPRET") == "1" and "triton.language" in sys.modules:
        from triton.language import standard

        if type(standard.zeros).__name__ == "JITFunction":
            pytest.fail(
                "triton was imported before TRITON_INTERPRET=1 was set; set it in the environment "
                "(or the root tests/conftest.py) so the Triton tests can run on the CPU interpreter"
            )
    yield
