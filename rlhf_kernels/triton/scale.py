"""``x *= scale`` in place, skipped on the device when ``scale == 1``: the backward of the losses whose gradient is
computed in the forward (``ops/_forward_grads.py``) on a GPU where the extension's CUDA kernels do not run.

``loss.backward()`` hands those backwards an upstream gradient of exactly 1, and reading it on the host would be a
sync; ``grad.mul_(scale)`` would read and write the whole gradient for nothing (bf16 8192 x 151936 logits: 2.5 GB
each way). Here every program reads the scale and returns at once when it is 1, so the launch moves no gradient
bytes; otherwise a grid-stride loop scales ``BLOCK`` values per step in float32, rounded once to ``x``'s dtype
(as ``csrc/cuda/ppo.cu``'s ``scale_unless_one_kernel``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import device_guard

_BLOCK = 4096
_WARPS = 8
_PROGRAMS_PER_SM = 8


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, n, BLOCK: tl.constexpr):
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        blocks = tl.cdiv(n, BLOCK)
        for blk in range(tl.program_id(0), blocks, tl.num_programs(0)):
            offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # (blk·BLOCK < n; the sum may pass 2^31)
            inside = offs < n
            x = tl.load(x_ptr + offs, mask=inside)
            tl.store(x_ptr + offs, (x.to(tl.float32) * scale).to(x_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=None)
def _programs_cap(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so its tests cross the grid-stride loop
    return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def scale_unless_one_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x *= scale`` (``x`` contiguous, ``scale`` one element on ``x``'s device), a no-op on the device when
    ``scale == 1``; returns ``x``."""
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()}")
    if scale.numel() != 1 or scale.device != x.device:
        raise ValueError(f"scale must be one element on {x.device}, got {tuple(scale.shape)} on {scale.device}")
    n = x.numel()
    if n == 0:
        return x
    block = min(_BLOCK, triton.next_power_of_2(n))
    programs = max(1, min(triton.cdiv(n, block), _programs_cap(x.device)))
    with device_guard(x):
        _scale_unless_one_kernel[(programs,)](x, scale.reshape(1).to(torch.float32), n, BLOCK=block,
                                              num_warps=_WARPS if block >= 1024 else 4)
    return x
