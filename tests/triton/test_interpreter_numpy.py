"""Triton's CPU interpreter and numpy: an installed pair that cannot work is named before a kernel runs.

Up to Triton 3.6 the interpreter takes ``int()`` of a one-element numpy array for a loop bound, which numpy 2.4
refuses; without this check a ``backend="triton"`` call on CPU tensors failed deep inside the first kernel with a
loop (``InterpreterError: TypeError('only 0-dimensional arrays can be converted to Python scalars')``, seen with
Triton 3.6.0 and numpy 2.4.6, the lent GPU machine's Triton with this machine's numpy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.ops import _dispatch


@pytest.mark.parametrize(
    "triton_version, numpy_version",
    [("3.2.0", "2.4.0"), ("3.6.0", "2.4.6"), ("3.6.0+git1a2b3c", "2.5.0rc1"), ("3.5.1", "3.0.0")],
)
def test_an_interpreter_older_than_3_7_with_numpy_2_4_or_newer_is_refused(triton_version, numpy_version):
    reason = _dispatch.interpreter_numpy_conflict(triton_version, numpy_version)
    assert reason is not None
    assert f"Triton {triton_version}" in reason and f"numpy {numpy_version}" in reason and "numpy<2.4" in reason


@pytest.mark.parametrize(
    "triton_version, numpy_version",
    [("3.2.0", "2.2.6"), ("3.6.0", "2.3.5"), ("3.7.0", "2.4.6"), ("3.8.0", "2.4.6"), ("4.0.0", "3.1.0")],
)
def test_pairs_that_work_are_not_refused(triton_version, numpy_version):
    assert _dispatch.interpreter_numpy_conflict(triton_version, numpy_version) is None


def test_missing_numpy_and_missing_triton():
    assert "needs numpy" in _dispatch.interpreter_numpy_conflict("3.8.0", None)
    assert _dispatch.interpreter_numpy_conflict(None, "2.4.6") is None
    assert _dispatch.interpreter_numpy_conflict("3.6.0", "not a version") is None  # nothing to compare: not refused


def test_the_installed_pair_is_what_the_interpreted_tests_run_on():
    """The constant read at import agrees with the versions this process imported (both packages are here)."""
    triton = pytest.importorskip("triton")
    expected = _dispatch.interpreter_numpy_conflict(triton.__version__, np.__version__)
    assert _dispatch.triton_interpreter_conflict() == expected


def test_a_forced_triton_call_on_cpu_tensors_names_the_conflict(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_TRITON_IMPORTABLE", True)
    reason = _dispatch.interpreter_numpy_conflict("3.6.0", "2.4.6")
    monkeypatch.setattr(_dispatch, "_INTERPRETER_CONFLICT", reason)
    cpu = torch.device("cpu")
    assert _dispatch.unavailable_reason("triton", cpu) == reason
    logits, targets = torch.randn(2, 5), torch.tensor([1, 4])
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run logprobs: Triton 3\.6\.0's interpreter"):
        rk.logprobs(logits, targets, backend="triton")
    # the automatic choice for CPU tensors never takes Triton, so it still runs
    torch.testing.assert_close(rk.logprobs(logits, targets), rk.logprobs(logits, targets, backend="torch"))
    monkeypatch.setattr(_dispatch, "_INTERPRETER_CONFLICT", None)
    assert _dispatch.unavailable_reason("triton", cpu) is None


def test_pytest_says_so_in_its_header(monkeypatch):
    from tests import conftest

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_INTERPRETER_CONFLICT", "Triton 3.6.0's interpreter needs numpy < 2.4")
    header = conftest.pytest_report_header(None)
    assert "needs numpy < 2.4; the tests of the interpreted Triton kernels will fail" in header
    monkeypatch.setattr(_dispatch, "_INTERPRETER_CONFLICT", None)
    assert conftest.pytest_report_header(None) is None
