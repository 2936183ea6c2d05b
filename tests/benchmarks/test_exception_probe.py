"""benchmarks/exception_probe.py: each C++ error case in a child process, reported as raised, wrong or crashed."""

from __future__ import annotations

import pytest

from benchmarks import exception_probe as ep
from rlhf_kernels import _ext


@pytest.mark.parametrize("name", [n for n, (gpu, _, _) in ep.CASES.items() if not gpu])
def test_cpu_cases_raise_here(name):
    outcome = ep.run_case(name)
    assert outcome.status == "raised", outcome


@pytest.mark.skipif(not _ext.has_cuda_kernels(), reason="extension built without CUDA kernels")
def test_the_pybind_function_case_raises_here():
    outcome = ep.run_case("extension pybind11 function")
    assert outcome.status == "raised" and "needs CUDA tensors" in outcome.detail, outcome


def test_a_crash_and_a_missing_error_are_reported_as_such(monkeypatch):
    monkeypatch.setitem(ep.CASES, "crash", (False, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", ""))
    monkeypatch.setitem(ep.CASES, "quiet", (False, "x = 1", ""))
    monkeypatch.setitem(ep.CASES, "other", (False, "raise ValueError('no')", ""))
    monkeypatch.setitem(ep.CASES, "message", (False, "raise RuntimeError('something else')", "expected words"))
    crash = ep.run_case("crash")
    assert crash.crashed and crash.status == "crashed (SIGSEGV)", crash
    assert ep.run_case("quiet").status == "no error"
    assert ep.run_case("other").status == "wrong error"
    message = ep.run_case("message")
    assert message.status == "wrong error" and not message.crashed


def test_main_prints_the_table_and_fails_on_a_crash(monkeypatch, capsys):
    monkeypatch.setattr(ep, "CASES", {"torch's own C++ check": ep.CASES["torch's own C++ check"]})
    assert ep.main([]) == 0
    out = capsys.readouterr().out
    assert "| torch's own C++ check | raised |" in out and "torch built with" in out
    monkeypatch.setitem(ep.CASES, "crash", (False, "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", ""))
    assert ep.main([]) == 1
    assert "## crash: crashed (SIGSEGV)" in capsys.readouterr().out
