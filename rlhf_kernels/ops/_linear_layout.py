"""Which layout a fused-linear op's chunk loop walks: row chunks or vocabulary slabs (``chunk_by``).

Row chunks take all ``V`` columns of a few rows at a time; a 16-bit head's weight
gradient then needs a ``[V, H]`` float32 accumulator. Vocabulary slabs take a few
columns of every row (``ops/_linear_slabs.py``): no such accumulator, but the
losses need a fourth matmul. ``linear_chunk_by`` (the losses) and
``logprobs_chunk_by`` (``linear_logprobs``) read the argument, then
``RLHF_KERNELS_LINEAR_CHUNK_BY``, then decide ``"auto"``.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from ._linear_common import _acc_dtype

LINEAR_CHUNK_BY = ("auto", "rows", "vocab")
# chunk_by="auto" weighs the row path's float32 accumulator against free memory on these devices only (the CPU's
# free memory is not the allocator's to count): rows there. Tests widen it.
AUTO_CHUNK_DEVICES = ("cuda",)
# The losses' chunk_by="auto" takes the vocabulary slabs on these devices whenever the row chunks would need the
# float32 [V, H] accumulator: on the CPU (no mixed-dtype GEMM, so the rows upcast every chunk's operands for it) the
# slabs ran bf16 2048 x 50257 x 512 in 0.81x / 0.85x the materialised time against the rows' 0.84x / 1.00x, at
# 0.10x / 0.09x its memory against 0.18x / 0.16x (cross-entropy / PPO; benchmarks/results/cpu-linear,
# linear_losses_cpu_bf16.md run 2). Tests narrow it.
SLABS_FIRST_DEVICES = ("cpu",)
# The share of the device's free memory the row path's accumulator may take under chunk_by="auto".
_AUTO_ROWS_SHARE = 0.9
_auto_fallback_warned = False


def _chunk_by_setting(chunk_by: Optional[str]) -> str:
    """``chunk_by`` as given, else ``RLHF_KERNELS_LINEAR_CHUNK_BY``, else ``"auto"``; checked against ``LINEAR_CHUNK_BY``."""
    if chunk_by is not None and not isinstance(chunk_by, str):
        raise TypeError(f"chunk_by must be a string or None, got {type(chunk_by).__name__} {chunk_by!r}")
    value = chunk_by if chunk_by is not None else os.environ.get("RLHF_KERNELS_LINEAR_CHUNK_BY", "")
    value = value.strip().lower() or "auto"
    if value not in LINEAR_CHUNK_BY:
        raise ValueError(f"chunk_by (or RLHF_KERNELS_LINEAR_CHUNK_BY) must be one of {LINEAR_CHUNK_BY}, got {value!r}")
    return value


def linear_chunk_by(chunk_by: Optional[str], weight: Optional[torch.Tensor] = None) -> str:
    """``"rows"`` or ``"vocab"``: ``chunk_by`` of the linear losses, else ``RLHF_KERNELS_LINEAR_CHUNK_BY``, else
    ``"auto"``, which takes the row chunks (3 matmuls, the fastest on the GPU) unless their ``[V, H]`` float32
    weight-gradient accumulator would not fit in the device's free memory, and then the vocabulary slabs (no such
    buffer, 4 matmuls) with a one-time warning, rather than running out of memory. On ``SLABS_FIRST_DEVICES`` (the
    CPU) the slabs whenever the rows would need that accumulator: faster there as well as leaner. ``weight``: the
    LM head whose gradient the loop computes; ``None`` when none is computed (the setting is still checked;
    ``"auto"`` is then ``"rows"``)."""
    value = _chunk_by_setting(chunk_by)
    if value != "auto":
        return value
    if _needs_float32_accumulator(weight) and weight.device.type in SLABS_FIRST_DEVICES:
        return "vocab"
    return _auto_chunk_by(weight)


def logprobs_chunk_by(chunk_by: Optional[str], weight: Optional[torch.Tensor] = None,
                      chunk_size: Optional[int] = None) -> str:
    """``"rows"`` or ``"vocab"``: ``chunk_by`` of ``linear_logprobs`` (and the losses' recompute path), read as
    ``linear_chunk_by`` reads it, but ``"auto"`` takes the vocabulary slabs whenever the row chunks would need a
    ``[V, H]`` float32 weight-gradient accumulator on an ``AUTO_CHUNK_DEVICES`` device (CUDA): ``weight``
    (``None`` when its gradient is not computed) is 16-bit and needs a gradient. The recompute path runs 4
    matmuls either way, so the slabs cost no extra matmul (only their ``[N, H]`` float32 ``grad_hidden``
    accumulator, and narrower GEMMs), while that accumulator is 2 GB at 128256 x 4096: ~1.3 instead of 3.1 GB at
    8192 tokens, expected from the H200's ``linear_cross_entropy`` runs of both paths
    (``benchmarks/results/nvidia-h200/NOTES.md``). Otherwise the row chunks: a float32 weight accumulates in its
    own gradient; without a weight gradient there is no accumulator; on the CPU, which has no mixed-dtype GEMM,
    the slabs' float32 accumulation upcasts every slab's operands and took 1.35x the materialised time against
    the rows' 1.17x (bf16, 2048 x 50257 x 512, ``benchmarks/results/cpu-linear``); and when ``chunk_size`` is
    given (rows per chunk, as it meant before ``chunk_by`` existed)."""
    value = _chunk_by_setting(chunk_by)
    if value != "auto":
        return value
    return "vocab" if _row_accumulator_on_auto_device(weight) and chunk_size is None else "rows"


def _row_accumulator_on_auto_device(weight: Optional[torch.Tensor]) -> bool:
    """The row chunks would hold a separate ``[V, H]`` float32 weight-gradient accumulator on an
    ``AUTO_CHUNK_DEVICES`` device: ``weight`` (``None`` when its gradient is not computed) needs a gradient and is
    16-bit (a float32 weight accumulates in its own gradient)."""
    return _needs_float32_accumulator(weight) and weight.device.type in AUTO_CHUNK_DEVICES


def _needs_float32_accumulator(weight: Optional[torch.Tensor]) -> bool:
    """``weight`` needs a gradient and is 16-bit, so row chunks would accumulate it in a separate float32 buffer."""
    return weight is not None and weight.requires_grad and _acc_dtype(weight.dtype) != weight.dtype


def _free_device_bytes(device: torch.device) -> int:
    """Bytes a new allocation can still get on ``device``: the driver's free memory plus what PyTorch's caching
    allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _auto_chunk_by(weight: Optional[torch.Tensor]) -> str:
    """``chunk_by="auto"``: ``"vocab"`` when the row path's float32 ``[V, H]`` accumulator would take more than
    ``_AUTO_ROWS_SHARE`` of the free memory of ``weight``'s device, else ``"rows"``. No accumulator (a float32
    weight accumulates in its own gradient, or no weight gradient) or a traced graph: ``"rows"``."""
    global _auto_fallback_warned
    if not _row_accumulator_on_auto_device(weight) or torch.compiler.is_compiling():
        return "rows"
    need = weight.numel() * torch.finfo(_acc_dtype(weight.dtype)).bits // 8
    free = _free_device_bytes(weight.device)
    if need <= _AUTO_ROWS_SHARE * free:
        return "rows"
    if not _auto_fallback_warned:
        _auto_fallback_warned = True
        warnings.warn(
            f"rlhf_kernels fused-linear ops: the row chunks' float32 weight-gradient accumulator ({need / 2**30:.2f} "
            f"GiB for a {tuple(weight.shape)} head) does not fit in free memory ({free / 2**30:.2f} GiB), so the "
            "gradient is computed over vocabulary slabs (chunk_by='vocab': no such buffer; the losses take one more "
            "matmul). Pass chunk_by= or set RLHF_KERNELS_LINEAR_CHUNK_BY to choose.",
            stacklevel=3,
        )
    return "vocab"
