"""What the compiled extension must hold on this machine (the tests that require the build read it from here)."""

from __future__ import annotations

import os
import shutil


def cuda_kernels_expected() -> bool:
    """True where the build must hold the CUDA kernels: ``nvcc`` is on PATH (``make test`` then builds with
    ``RLHF_KERNELS_FORCE_CUDA=1``) and the build was not told to skip them. ``make test-oldest`` sets
    ``RLHF_KERNELS_SKIP_CUDA=1``: torch 2.6 is a CUDA 12 build, and torch refuses to compile with another major
    version of nvcc (13 here)."""
    return shutil.which("nvcc") is not None and os.environ.get("RLHF_KERNELS_SKIP_CUDA") != "1"
