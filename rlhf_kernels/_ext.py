"""Loads the compiled extension ``rlhf_kernels._C`` and reports what it holds.

The package works without the extension (reference backend); importing it
never fails. The first time a caller needs the extension and it is missing,
one warning says why.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

_load_error: Optional[str] = None
_warned = False


_module = None
_attempted = False
_with_cuda = False  # set by load(): torch.compile traces through the dispatch and cannot call pybind


def load():
    """The ``rlhf_kernels._C`` module, or ``None`` when it cannot be loaded (tried once)."""
    global _module, _attempted, _load_error, _with_cuda
    if not _attempted:
        _attempted = True
        try:
            import torch  # noqa: F401  (the extension links against libtorch)

            from rlhf_kernels import _C  # type: ignore[attr-defined]

            _module = _C
            _with_cuda = bool(_C.compiled_with_cuda())
        except (ImportError, OSError) as exc:  # missing build, ABI mismatch, missing libs
            _load_error = f"{type(exc).__name__}: {exc}"
    return _module


def available() -> bool:
    """True when the compiled extension (at least its CPU kernels) is loaded."""
    return load() is not None


def load_error() -> Optional[str]:
    """Why the extension is not available, or ``None`` when it is."""
    load()
    return _load_error


def warn_once_if_missing() -> None:
    """Warn (once per process) that the C++ backends fall back to the reference."""
    global _warned
    if not available() and not _warned:
        _warned = True
        warnings.warn(
            "rlhf_kernels: compiled extension not available "
            f"({load_error()}); using the PyTorch reference backend. "
            "Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels (read once by ``load``, then a plain bool)."""
    load()
    return bool(_with_cuda)


def cuda_arch_list() -> str:
    """The CUDA architectures the extension was compiled for ('' when none)."""
    ext = load()
    return ext.cuda_arch_list() if ext is not None else ""


def oldest_cuda_arch() -> tuple[int, int]:
    """The oldest architecture in ``cuda_arch_list()`` as ``(major, minor)``; ``(0, 0)`` when none is listed."""
    versions = [(int(m.group(1)), int(m.group(2))) for m in re.finditer(r"(\d+)\.(\d+)", cuda_arch_list())]
    return min(versions) if versions else (0, 0)


_runs_on: dict = {}  # device index -> whether the CUDA kernels run there


def cuda_kernels_run_on(device) -> bool:
    """Whether the extension's CUDA kernels can run on the CUDA ``device``: built with them, and the GPU at least
    the oldest architecture they were compiled for (its SASS runs on that major's later minors, the PTX of the
    newest on later GPUs; a pre-Ampere GPU has no kernel image for the default ``8.0;9.0+PTX``). Read once per
    device index."""
    if not has_cuda_kernels():
        return False
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    runs = _runs_on.get(index)
    if runs is None:
        runs = _runs_on[index] = tuple(torch.cuda.get_device_capability(index)) >= oldest_cuda_arch()
    return runs


def cuda_kernels() -> dict:
    """``op -> CUDA kernel names`` compiled into the extension (empty without CUDA kernels)."""
    ext = load()
    if ext is None or not hasattr(ext, "cuda_kernels"):
        return {}
    return dict(ext.cuda_kernels())


def cpu_capability() -> str:
    """The CPU vector instruction set the C++ kernels were compiled for."""
    ext = load()
    return ext.cpu_capability() if ext is not None else ""
