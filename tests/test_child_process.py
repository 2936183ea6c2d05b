"""tests/child_process.py: a crash in the child fails only the calling test; other outcomes come back as they were."""

from __future__ import annotations

import os
import signal

import pytest

from tests.child_process import run_in_child


def _returns(x):
    return x * 2


def _asserts():
    assert 1 == 2, "the child's assertion"


def _crashes():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_the_child_result_comes_back():
    assert run_in_child(_returns, 21) == 42


def test_the_child_assertion_comes_back_as_itself():
    with pytest.raises(AssertionError, match="the child's assertion"):
        run_in_child(_asserts)


def test_a_crash_of_the_child_fails_the_test_by_name():
    with pytest.raises(pytest.fail.Exception, match="_crashes ended its child process"):
        run_in_child(_crashes)
