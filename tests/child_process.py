"""Running a test body in a child process, for checks that might end the process instead of failing.

On the lent H200 a C++ error of the extension ended the process with SIGSEGV (runs 5 and 6;
``benchmarks/exception_probe.py``) and took the rest of ``pytest -m gpu`` down with it. A test whose body
provokes such errors runs it here: an assertion or pytest failure in the child comes back as itself; a crash
fails only this test, by name.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest


def run_in_child(fn, *args, timeout: float = 300.0):
    """``fn(*args)`` in a fresh interpreter (spawn: CUDA cannot be forked); its result, or its exception re-raised.

    ``fn`` must be a module-level function (it is pickled by name and imported in the child).
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result(timeout=timeout)
        except BrokenProcessPool:
            pytest.fail(f"{fn.__module__}.{fn.__qualname__} ended its child process (a C++ error that crashed "
                        "instead of raising? `python -m benchmarks.exception_probe` says where)", pytrace=False)


def child_pytest_environment(**overrides: str) -> dict[str, str]:
    """This process's environment, with ``overrides``, for a pytest run in a child process: without pytest-xdist's
    ``PYTEST_XDIST_*`` variables, since under ``make test`` a child that inherits ``PYTEST_XDIST_WORKER`` believes
    it is a worker too (pytest-benchmark then disables its benchmarks)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_XDIST_")}
    env.update(overrides)
    return env
