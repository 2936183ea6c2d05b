"""Target checks without a host sync: ``RLHF_KERNELS_VALIDATE=async``.

Why: the default check (``logprobs.TargetCheck``) reads its answer on the
host, so the CPU waits for every kernel queued ahead of it; what the CPU
launches after that runs only when it gets there. On an H100, read after the
op's kernel, that cost 0.16 ms of a 1.16 ms ``rk.logprobs`` call and 0.27 ms of
a 1.35 ms ``rk.ppo_loss`` call (bf16, 8192 x 151936;
``benchmarks/results/nvidia-h100-80gb-hbm3/logs``). The default now reads it
once the op's kernel is queued (``PendingRange``), so only the host waits.

With ``async`` a check on a CUDA tensor queues three numbers instead, on the
op's stream: whether a target is bad, the flat index of the first bad one and
its value, copied without blocking into pinned host memory behind an event.
The next op that validates (or :func:`check_pending_targets`, which waits)
raises the ``ValueError`` of every finished check that found a bad target,
naming its position as the synchronous check does, plus the op it came from.
The price: the error surfaces one call late, after the bad call's NaN log-prob
(the kernels never read a bad target) may have reached a loss. A check still
pending when Python exits is waited for and reported on stderr.

CPU tensors are checked at once (their kernels have already run, so there is
no queue to stall). During CUDA graph capture every check is skipped, as
``RLHF_KERNELS_VALIDATE=0`` would be (a captured copy would refill the buffer
at every replay, long after this call's check was read; the kernels never read
a bad target, whose token gets NaN).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import sys
import threading
from typing import Deque, List, Optional

import torch

from .. import _ext
from ._checks import target_range

ENV = "RLHF_KERNELS_VALIDATE"
MODES = {"0": "off", "1": "sync", "sync": "sync", "async": "async"}

# Devices whose checks are deferred in async mode (tests add "cpu" to exercise the queue without a GPU).
ASYNC_DEVICES: tuple[str, ...] = ("cuda",)
# Devices whose synchronous check is read after the op's kernel is queued (``PendingRange``; tests add "cpu").
OVERLAP_DEVICES: tuple[str, ...] = ("cuda",)
# The most targets the extension's one-CTA range kernel checks (512 KB of int64); more go to PyTorch's reductions,
# which spread over the GPU.
ONE_CTA_TARGETS = 1 << 16


def validation_mode() -> str:
    """``"sync"`` (default, ``RLHF_KERNELS_VALIDATE`` unset or ``1``), ``"async"`` or ``"off"`` (``0``)."""
    raw = os.environ.get(ENV, "1").strip().lower() or "1"
    if raw not in MODES:
        raise ValueError(f"{ENV} must be one of {sorted(MODES)}, got {raw!r}")
    return MODES[raw]


def bad_target_message(position, value: int, vocab: int, ignore_index: int) -> str:
    """The error text of a target outside ``[0, vocab)`` that is not ``ignore_index`` (both check modes)."""
    return f"targets{list(position)} = {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}"


class _Check:
    """One queued check: ``host = [any bad, flat index of the first, its value]`` once ``event`` has completed."""

    __slots__ = ("host", "event", "shape", "vocab", "ignore_index", "op")

    def __init__(self, host, event, shape, vocab, ignore_index, op):
        self.host, self.event, self.shape = host, event, shape
        self.vocab, self.ignore_index, self.op = vocab, ignore_index, op

    def done(self, wait: bool) -> bool:
        if self.event is None:
            return True
        if wait:
            self.event.synchronize()
            return True
        return bool(self.event.query())

    def error(self) -> Optional[str]:
        """The message for a bad target (``None`` when every target was fine); only once :meth:`done`."""
        found, flat, value = (int(v) for v in self.host.tolist())
        if not found:
            return None
        position = []
        for size in reversed(self.shape):
            flat, index = divmod(flat, size)
            position.append(index)
        return (bad_target_message(tuple(reversed(position)), value, self.vocab, self.ignore_index)
                + f" (found by {ENV}=async after an earlier {self.op} call returned)")


class PendingRange:
    """The default (synchronous) check of one call, queued ahead of its kernel and read after it.

    ``_checks.target_range`` of the targets (on CUDA one kernel of the extension, ``target_range_to_host``, where
    PyTorch takes four), copied without blocking into pinned host memory behind an event.
    The op queues its kernel, then :meth:`read` waits for that event alone, not for the kernel queued after it:
    the GPU goes from the check straight into the kernel, while the CPU learns the answer and the error (if any)
    still comes from the call that was given the bad target. Read before the kernel was queued, the GPU idled
    from the check's end until the CPU had launched the kernel.
    """

    __slots__ = ("event", "host")

    def __init__(self, targets: torch.Tensor, ignore_index: int):
        self.event = None
        if not targets.is_cuda:
            self.host = target_range(targets, ignore_index)
            return
        with torch.cuda.device(targets.device):  # the copy and its event on the targets' GPU and stream
            # one kernel and the copy (csrc/cuda/target_range.cu), up to the targets one CTA reads in a few µs
            if targets.numel() <= ONE_CTA_TARGETS and _ext.cuda_kernels_run_on(targets.device):
                self.host = torch.empty(2, dtype=torch.int64, pin_memory=True)
                torch.ops.rlhf_kernels_C.target_range_to_host.default(targets, ignore_index, self.host)
            else:  # four small PyTorch kernels, then the copy
                packed = target_range(targets, ignore_index)
                self.host = torch.empty(2, dtype=packed.dtype, pin_memory=True)
                self.host.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> tuple[int, int]:
        """``(min, max)`` of the targets, ``ignore_index`` counted as 0 (waits for the check, not what follows)."""
        if self.event is not None:
            self.event.synchronize()
        lo, hi = self.host.tolist()
        return lo, hi


_QUEUE: Deque[_Check] = collections.deque()
_LOCK = threading.Lock()


def mode_for(targets: torch.Tensor) -> str:
    """How ``targets`` are checked: ``validation_mode()``, except that the check is skipped while a CUDA graph is
    captured (``"off"``: a captured check could only read the capture-time targets, never a replay's, and reading
    it would break the capture), and async mode checks tensors off ``ASYNC_DEVICES`` at once (``"sync"``)."""
    mode = validation_mode()
    if mode == "off":
        return mode
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return "off"
    if mode == "async" and targets.device.type not in ASYNC_DEVICES:
        return "sync"
    return mode


def enqueue(targets: torch.Tensor, vocab: int, ignore_index: int, op: str) -> None:
    """Queue ``targets``' check on the current stream: a few tiny kernels and a non-blocking copy, no sync."""
    flat = targets.reshape(-1)
    if flat.numel() == 0:
        return
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
    first = bad.to(torch.int32).argmax().reshape(1)  # the first bad target (argmax keeps the first maximum); 0 if none
    value = flat.index_select(0, first)  # a device gather: indexing with a 0-d tensor may read it on the host
    packed = torch.cat([bad.any().reshape(1).to(torch.int64), first.to(torch.int64), value.to(torch.int64)])
    event = None
    if packed.is_cuda:
        with torch.cuda.device(packed.device):  # the copy and its event on the targets' GPU and stream
            host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
    else:
        host = packed
    with _LOCK:
        _QUEUE.append(_Check(host, event, tuple(targets.shape), vocab, ignore_index, op))


def raise_finished(wait: bool = False) -> None:
    """Drop every finished check (all of them, waiting, with ``wait``); ``ValueError`` with the messages of
    those that found a bad target."""
    errors: List[str] = []
    with _LOCK:
        still: Deque[_Check] = collections.deque()
        while _QUEUE:
            check = _QUEUE.popleft()
            if not check.done(wait):
                still.append(check)
                continue
            message = check.error()
            if message is not None:
                errors.append(message)
        _QUEUE.extend(still)
    if errors:
        raise ValueError(errors[0] if len(errors) == 1 else f"{len(errors)} bad targets: " + "; ".join(errors))


def check_pending_targets() -> None:
    """Wait for every target check ``RLHF_KERNELS_VALIDATE=async`` has queued and raise ``ValueError`` naming
    the bad targets they found (a host sync; a no-op in the other modes, whose checks never wait)."""
    raise_finished(wait=True)


@contextlib.contextmanager
def async_target_checks():
    """Inside: target checks are queued (``RLHF_KERNELS_VALIDATE=async``, unless the variable is set, which wins);
    on leaving, the pending ones are waited for and a bad target raises, as :func:`check_pending_targets` does.

    For a training loop that syncs once per step anyway (reading its loss): it calls
    :func:`check_pending_targets` there, so a bad target still fails the step it was in, naming its position
    and op, while the ops inside the step never stop the host. The trainer (``rlhf_kernels/trainer``) runs its
    loops this way.
    """
    chosen = os.environ.get(ENV)
    if chosen is None:
        os.environ[ENV] = "async"
    try:
        yield
    finally:
        if chosen is None:
            os.environ.pop(ENV, None)
    check_pending_targets()


def _report_at_exit() -> None:
    try:
        raise_finished(wait=True)
    except ValueError as exc:
        print(f"rlhf_kernels: {exc}", file=sys.stderr)
    except Exception:  # noqa: BLE001 - a CUDA context already torn down must not turn exit into a traceback
        pass


atexit.register(_report_at_exit)
