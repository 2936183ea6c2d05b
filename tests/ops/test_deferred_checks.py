"""``RLHF_KERNELS_VALIDATE=async``: target checks queued without a host sync, reported by the next op.

On the CPU the queue is exercised by adding "cpu" to ``_deferred_checks.ASYNC_DEVICES`` (CPU tensors are
otherwise checked at once); the GPU test checks that no host sync happens at all.
"""

import os

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.ops import _deferred_checks as deferred
from tests.bad_targets import OPS_WITH_TARGETS, call_with_bad_target


@pytest.fixture
def async_cpu(monkeypatch):
    """Async mode, with CPU tensors deferred like CUDA ones; an empty queue before and after."""
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "async")
    monkeypatch.setattr(deferred, "ASYNC_DEVICES", ("cpu", "cuda"))
    deferred._QUEUE.clear()
    yield
    deferred._QUEUE.clear()


def _logits_targets(bad_at=None, value=10):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    if bad_at is not None:
        targets[bad_at] = value
    return logits, targets


@pytest.mark.parametrize("raw, mode", [("0", "off"), ("1", "sync"), ("", "sync"), ("sync", "sync"), ("ASYNC", "async")])
def test_validation_mode_reads_the_environment(monkeypatch, raw, mode):
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", raw)
    assert deferred.validation_mode() == mode


def test_a_misspelt_mode_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "asnyc")
    logits, targets = _logits_targets()
    with pytest.raises(ValueError, match="RLHF_KERNELS_VALIDATE must be one of"):
        rk.logprobs(logits, targets)


def test_the_next_call_reports_a_bad_target_of_an_earlier_one(async_cpu):
    logits, bad = _logits_targets(bad_at=(1, 2))
    lp = rk.logprobs(logits, bad, backend="torch")  # queued, not raised
    assert torch.isnan(lp[1, 2]) and torch.isfinite(lp[0]).all()
    logits, good = _logits_targets()
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10 is outside \[0, 10\) .*earlier logprobs call"):
        rk.logprobs(logits, good, backend="torch")
    rk.logprobs(logits, good, backend="torch")  # reported once: only good calls' checks are left
    rk.check_pending_targets()
    assert not deferred._QUEUE


def test_check_pending_targets_waits_and_names_the_first_bad_target(async_cpu):
    logits, targets = _logits_targets(bad_at=(1, 0), value=-4)
    targets[1, 2] = 99  # later in row-major order: not the one named
    rk.logprobs(logits, targets, backend="torch")
    with pytest.raises(ValueError, match=r"targets\[1, 0\] = -4 "):
        rk.check_pending_targets()
    rk.check_pending_targets()  # nothing left


def test_a_bad_call_after_a_bad_call_reports_the_first_and_queues_its_own(async_cpu):
    logits, first = _logits_targets(bad_at=(0, 1))
    rk.logprobs(logits, first, backend="torch")
    logits, second = _logits_targets(bad_at=(1, 1), value=-3)
    with pytest.raises(ValueError, match=r"^targets\[0, 1\] = 10 "):
        rk.logprobs(logits, second, backend="torch")
    with pytest.raises(ValueError, match=r"^targets\[1, 1\] = -3 "):
        rk.check_pending_targets()


def test_every_finished_bad_check_is_in_one_error(async_cpu):
    for where in ((0, 1), (1, 1)):
        _, targets = _logits_targets(bad_at=where)
        deferred.enqueue(targets, 10, -100, "logprobs")
    with pytest.raises(ValueError, match=r"2 bad targets: targets\[0, 1\] = 10 .*; targets\[1, 1\] = 10 "):
        rk.check_pending_targets()


def test_ignore_index_is_not_bad(async_cpu):
    logits, targets = _logits_targets(bad_at=(0, 0), value=-100)
    rk.logprobs(logits, targets, backend="torch")
    rk.check_pending_targets()


@pytest.mark.parametrize("op", OPS_WITH_TARGETS)
def test_every_op_with_targets_queues_its_check(async_cpu, op):
    call, where = call_with_bad_target(op)
    call()  # queued, not raised
    name = "ppo_loss" if op.startswith("ppo_loss") else op
    with pytest.raises(ValueError, match=where + r" is outside \[0, 10\) .*" + name):
        rk.check_pending_targets()


def test_cpu_tensors_are_checked_at_once_in_async_mode(monkeypatch):
    """Off ASYNC_DEVICES (the CPU by default) async mode raises in the call itself: no queue to stall."""
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "async")
    logits, targets = _logits_targets(bad_at=(0, 2))
    with pytest.raises(ValueError, match=r"targets\[0, 2\] = 10"):
        rk.logprobs(logits, targets, backend="torch")
    assert not deferred._QUEUE


def test_a_check_pending_at_exit_is_reported_on_stderr(async_cpu, capsys):
    logits, targets = _logits_targets(bad_at=(0, 0))
    rk.logprobs(logits, targets, backend="torch")
    deferred._report_at_exit()
    assert "rlhf_kernels: targets[0, 0] = 10" in capsys.readouterr().err
    assert not deferred._QUEUE


@pytest.mark.gpu
def test_async_validation_does_not_sync_the_host(monkeypatch):
    """The default check waits for its answer: since 07c9a31 on the event behind its copy into pinned memory
    (PendingRange), a wait torch's sync debug mode does not see (H200 run 7: the version of this test that expected
    that mode to raise failed), so the waits are counted on torch.cuda.Event.synchronize. The async check waits on
    nothing and makes no sync the debug mode sees ("error"); the bad target is still reported, by
    check_pending_targets."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    logits = torch.randn(4, 64, 1000, device="cuda")
    targets = torch.randint(0, 1000, (4, 64), device="cuda")
    rk.logprobs(logits, targets)  # warm-up (autotuning, lazy loading) outside the debug mode
    bad = targets.clone()
    bad[3, 7] = 1000  # outside the debug mode: writing a Python scalar into a CUDA tensor counts as a sync
    deferred._QUEUE.clear()
    waits = []
    wait = torch.cuda.Event.synchronize

    def counted(event):
        waits.append(event)
        return wait(event)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)
    rk.logprobs(logits, targets)  # the default check
    assert waits, "the default check did not wait for its answer"
    with pytest.raises(ValueError, match=r"targets\[3, 7\] = 1000 is outside \[0, 1000\)"):
        rk.logprobs(logits, bad)  # ... and its error comes from the call given the bad target
    waits.clear()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "async")
        lp = rk.logprobs(logits, bad)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert not waits, "the async check waited"
    assert torch.isnan(lp[3, 7]).item()
    with pytest.raises(ValueError, match=r"targets\[3, 7\] = 1000 is outside \[0, 1000\)"):
        rk.check_pending_targets()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_find_bad_target_names_the_first_bad_one(dtype):
    """The synchronous check's answer, against a direct scan: none for empty, all-ignored and in-range targets
    (ignore_index negative, inside [0, V) or past it); else the first bad position in row-major order."""
    from rlhf_kernels.ops._checks import find_bad_target

    def scan(t, vocab, ignore):
        for position in torch.cartesian_prod(*(torch.arange(n) for n in t.shape)).reshape(-1, t.dim()).tolist():
            value = int(t[tuple(position)])
            if value != ignore and not 0 <= value < vocab:
                return tuple(position), value
        return None

    g = torch.Generator().manual_seed(5)
    assert find_bad_target(torch.empty(0, 3, dtype=dtype), 10, -100) is None
    assert find_bad_target(torch.full((2, 3), -100, dtype=dtype), 10, -100) is None
    # vocab 1 too: there an ignored target counted as anything but 0 would be out of range
    for vocab in (10, 1):
        for ignore in (-100, 0, 3, 10, 12):
            for _ in range(20):
                t = torch.randint(-2, 13, (3, 4), generator=g, dtype=torch.int64).to(dtype)
                t[torch.rand(3, 4, generator=g) < 0.3] = ignore
                expected = scan(t, vocab, ignore)
                assert find_bad_target(t, vocab, ignore) == expected, (vocab, ignore, t)
                if expected is not None:  # the caller's range check already found one: located without it
                    assert find_bad_target(t, vocab, ignore, checked=True) == expected, (vocab, ignore, t)
            t = torch.randint(0, vocab, (3, 4), generator=g).to(dtype)
            assert find_bad_target(t, vocab, ignore) is None


def test_async_target_checks_queues_inside_and_raises_on_leaving(monkeypatch):
    """rk.async_target_checks: async inside (unless the variable is set), restored after, pending checks raised
    on leaving; the user's own setting wins."""
    monkeypatch.delenv("RLHF_KERNELS_VALIDATE", raising=False)
    monkeypatch.setattr(deferred, "ASYNC_DEVICES", ("cpu", "cuda"))
    deferred._QUEUE.clear()
    logits, targets = _logits_targets(bad_at=(1, 2))
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10"):
        with rk.async_target_checks():
            assert deferred.validation_mode() == "async"
            rk.logprobs(logits, targets, backend="torch")  # queued, not raised here
    assert "RLHF_KERNELS_VALIDATE" not in os.environ and not deferred._QUEUE
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "1")
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10"):
        with rk.async_target_checks():
            rk.logprobs(logits, targets, backend="torch")  # the user's synchronous mode: raised at the call
    assert os.environ["RLHF_KERNELS_VALIDATE"] == "1"
