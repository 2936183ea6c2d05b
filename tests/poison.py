"""Test helpers that make unwritten memory and extra allocations visible, shared by the op tests."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def poisoned_allocations():
    """Every fresh tensor (from C++ kernels too) starts filled with NaN, so unwritten elements show."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


def peak_extra_cuda_bytes(fn) -> int:
    """Peak CUDA memory allocated while ``fn()`` runs, beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def zero_fills_during(fn, min_numel: int) -> list:
    """``(op, shape)`` of every zero-filled tensor of at least ``min_numel`` elements created while ``fn()`` runs.

    Catches the autograd engine materialising zero upstream gradients for a custom op's unused outputs
    (``aten.zeros``), which for an output shaped like the logits or the LM head is a gradient-sized buffer and a
    full memory pass.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if any(k in name for k in ("zero", "full", "fill")):
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.numel() >= min_numel:
                        seen.append((name, tuple(t.shape)))
            return out

    with Record():
        fn()
    return seen
