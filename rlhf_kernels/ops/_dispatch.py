"""Backend choice shared by every op (DESIGN.md §3).

Order for ``backend=None``: CUDA tensors -> Triton (or the CUDA C++ kernel
where ``GPU_PREFERENCE`` lists it first for the op), CPU tensors -> the C++ CPU kernel, anything else or a
missing extension -> the PyTorch reference. ``backend=`` on the call forces a
backend (an error if it cannot run here); ``RLHF_KERNELS_BACKEND`` sets a
process-wide preference that falls back to the automatic choice for ops or
devices it cannot serve.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Iterable, Optional

import packaging.version
import torch

from .. import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch")

# The automatic choice for CUDA tensors, per op: the first live backend with a kernel wins.
# Triton leads until the committed benchmarks (benchmarks/results/<gpu>/) show the CUDA C++
# kernel faster for that op; flip an entry to ("cuda", "triton") then, in the same commit as
# the results (`python -m benchmarks.preference benchmarks/results/<gpu>` tabulates them per op).
# Ops not listed use _GPU_DEFAULT.
_GPU_DEFAULT = ("triton", "cuda")
GPU_PREFERENCE = {
    # H200 (benchmarks/results/nvidia-h200, runs 20261126T0255* and T0302*): cuda faster in 71 of the 72 logprobs /
    # logprobs+entropy cells (bf16 and fp32, N 4096-16384, V 50257-151936; fp32 4096x50257 fwd the exception),
    # e.g. bf16 8192x151936 fwd 0.674 ms vs triton 0.915, fwd+bwd 2.370 vs 2.685
    "logprobs": ("cuda", "triton"),
    # matmul-bound: cuda and triton within 4% (H200, N=8192/16384, H=4096); triton's single chunk buffer
    "linear_logprobs": ("triton", "cuda"),
    # H200, the whole grid (bf16 and fp32, run 3 with Triton's retiled forwards): cuda faster in 32 of 36 cells, the
    # other 4 within 1% but bf16 8192x151936 fwd+bwd (3.232 ms vs 3.122); the H100 agreed
    "kl_divergence": ("cuda", "triton"),
    # H200 bf16 8192x151936 (run 4, logs/run4, the zero-filled second gradient gone): cuda's fused step (dlogits in
    # the forward) 1.922 ms vs triton's two passes 3.307 with the default target check, 1.83 vs 1.99 without it
    # (tune_cuda); forward 0.670 vs 0.861. Same peak (2377 MiB, one gradient)
    "ppo_loss": ("cuda", "triton"),
    "gae": ("triton", "cuda"),
}


# Looked up once at import (without importing triton): a constant for torch.compile to trace.
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None


def _release(version: str) -> Optional[tuple]:
    """The release numbers of a version string (``"3.6.0+git1a2b"`` -> ``(3, 6, 0)``), None if it is not PEP 440."""
    try:
        return packaging.version.Version(version).release
    except packaging.version.InvalidVersion:
        return None


def interpreter_numpy_conflict(triton_version: Optional[str], numpy_version: Optional[str]) -> Optional[str]:
    """Why Triton's CPU interpreter cannot run with these installed versions (``None`` when it can).

    The interpreter holds tensors as numpy arrays. Up to Triton 3.6 it takes a loop bound's Python value as
    ``int()`` of a one-element array, which numpy 2.4 refuses (``TypeError: only 0-dimensional arrays can be
    converted to Python scalars``, deep inside the first kernel with a loop); Triton 3.7 squeezes the array first."""
    if triton_version is None:
        return None
    if numpy_version is None:
        return "Triton's interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"
    triton_release, numpy_release = _release(triton_version), _release(numpy_version)
    if triton_release is None or numpy_release is None:  # a build whose version says nothing we can compare
        return None
    if triton_release < (3, 7) and numpy_release >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) needs numpy < 2.4, found numpy "
                f"{numpy_version}: pip install 'numpy<2.4' (or Triton >= 3.7)")
    return None


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` (its metadata, without importing it), None if not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Also a constant (the installed versions do not change while the process runs); read without importing either.
_INTERPRETER_CONFLICT = (
    interpreter_numpy_conflict(installed_version("triton"), installed_version("numpy"))
    if _TRITON_IMPORTABLE
    else None
)


def triton_interpreter_conflict() -> Optional[str]:
    """Why the installed Triton's CPU interpreter cannot run with the installed numpy (``None`` when it can)."""
    return _INTERPRETER_CONFLICT


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported."""
    return _TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_kind(name: str) -> Optional[str]:
    """``"cpu"`` or ``"cuda"`` for a device name this package runs on (``cpu``, ``cuda``, ``cuda:N``), else None
    (a malformed name or another kind): the CLIs' check before anything is built."""
    try:
        kind = torch.device(name).type
    except RuntimeError:
        return None
    return kind if kind in ("cpu", "cuda") else None


def resolve_device(pref: str = "auto") -> torch.device:
    """``auto``: CUDA when there is a GPU, else the CPU. Asking for CUDA without one is a ``ValueError``
    naming ``device``, not torch's driver error from deep inside the first ``.to()`` (the trainer's configs and
    ``rlhf-kernels bench --device`` both resolve through here)."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r}: no CUDA device is available here (torch.cuda.is_available() is "
                         "False); use --device cpu or auto")
    return device


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` (``None`` when it can)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend needs CPU tensors, got {device.type}"
        if not _ext.available():
            return f"compiled extension missing ({_ext.load_error()})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        if not _ext.has_cuda_kernels():
            return "extension built without CUDA kernels" if _ext.available() else (
                f"compiled extension missing ({_ext.load_error()})"
            )
        # (not while compiling: tracing need not see the device; on a GPU the kernels cannot run on, their launch fails)
        if not torch.compiler.is_compiling() and not _ext.cuda_kernels_run_on(device):
            major, minor = torch.cuda.get_device_capability(device)
            return (f"the CUDA kernels were compiled for {_ext.cuda_arch_list()}, not for this GPU "
                    f"(sm_{major}{minor}); rebuild with TORCH_CUDA_ARCH_LIST including it")
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return triton_interpreter_conflict()
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")


def _automatic(op: str, device: torch.device, implemented: Iterable[str]) -> str:
    implemented = tuple(implemented)
    preference = GPU_PREFERENCE.get(op, _GPU_DEFAULT) if device.type == "cuda" else ("cpu",)
    for candidate in preference:
        if candidate in implemented and unavailable_reason(candidate, device) is None:
            return candidate
    if device.type == "cpu" and "cpu" in implemented:
        _ext.warn_once_if_missing()
    return "torch"


CUDA_FWD_THREADS = (32, 64, 128, 256, 512)


def cuda_forward_threads() -> Optional[int]:
    """The ``RLHF_KERNELS_CUDA_FWD_THREADS`` setting: the CUDA forward kernels' CTA size cap, or ``None``
    when unset (each kernel's own default: ``k*ForwardCap`` in ``csrc/cuda/row_common.cuh``).

    A tuning knob for ``benchmarks/tune_cuda.py``; the kernels read it at launch and fall back
    to their default on anything else, so a bad value is rejected here, before a launch, by name.
    """
    text = os.environ.get("RLHF_KERNELS_CUDA_FWD_THREADS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) not in CUDA_FWD_THREADS:
        raise ValueError(f"RLHF_KERNELS_CUDA_FWD_THREADS must be one of {CUDA_FWD_THREADS}, got {text!r}")
    return int(text)


def resolve_backend(op: str, device: torch.device, backend: Optional[str], implemented: Iterable[str]) -> str:
    """Pick the backend that runs ``op`` for tensors on ``device``.

    ``implemented`` lists the backends that have a kernel for this op
    (``"torch"`` is always implied).
    """
    chosen = _resolve(op, device, backend, implemented)
    if chosen == "cuda":
        cuda_forward_threads()
    return chosen


def _resolve(op: str, device: torch.device, backend: Optional[str], implemented: Iterable[str]) -> str:
    implemented = tuple(implemented) + ("torch",)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend not in implemented:
            raise ValueError(f"backend={backend!r} has no kernel for {op}; implemented: {implemented}")
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run {op}: {reason}")
        return backend
    preferred = preferred_backend()
    if preferred and preferred in implemented and unavailable_reason(preferred, device) is None:
        return preferred
    return _automatic(op, device, implemented)


def preferred_backend() -> Optional[str]:
    """The ``RLHF_KERNELS_BACKEND`` setting: a backend every op prefers where it can run, or ``None`` (``auto``
    or unset: the automatic choice)."""
    preferred = os.environ.get("RLHF_KERNELS_BACKEND", "").strip().lower()
    if not preferred or preferred == "auto":
        return None
    if preferred not in BACKENDS:
        raise ValueError(f"RLHF_KERNELS_BACKEND must be one of {BACKENDS} or 'auto', got {preferred!r}")
    return preferred
