"""Shared pieces of the fused-linear ops (``ops/linear.py``): their input checks and dtype promotion, the sizes of
row chunks and vocabulary slabs, each chunk's logits into a 16-byte aligned buffer, the backend's log-prob
kernels on one chunk, and the gradients that follow them (the GEMMs themselves: ``_linear_gemm``)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_chunk_size,
    check_integer,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from ._linear_gemm import grad_hidden_gemm, grad_weight_gemm, logits_gemm
from .logprobs import IMPLEMENTED as _LOGPROBS_IMPLEMENTED
from .logprobs import _torch_bwd, _torch_fwd

IMPLEMENTED = tuple(_LOGPROBS_IMPLEMENTED)

_MIB = 1 << 20
# Logits bytes per chunk. On the CPU ~32 MiB keeps a chunk near the caches' reach
# while the dW GEMM (K = chunk rows) stays compute-bound; on the GPU 64-256 MiB
# (1/16 of free memory) is enough rows to saturate the tensor cores.
_CPU_CHUNK_BYTES = 32 * _MIB
_GPU_CHUNK_BYTES = (64 * _MIB, 256 * _MIB)
# chunk_by="vocab": bytes of a slab's logits buffers on the GPU. Every slab reads and writes grad_hidden's float32
# [N, H] accumulator (268 MB at N = 8192, H = 4096), so slabs too narrow cost bandwidth; too wide, memory. At
# 96 MiB, 8192 x 128256 x 4096 bf16 takes 42 slabs of 3072 columns on the CUDA backend (two buffers) and 21 of
# 6144 on Triton's, fewer than the 51 / 32 of the former 128 MiB, which also held the slab's float32 weight gradient.
_GPU_SLAB_BYTES = 96 * _MIB
# The losses' vocabulary slabs (_linear_fused._vocab_slab_loss) touch no [N, H] accumulator (grad_hidden comes from
# a row sweep first), so narrow slabs cost little there: at 48 MiB, 8192 x 128256 x 4096 bf16 peaks near grad_weight
# + grad_hidden + 48 = 1114 MiB (Liger-Kernel's bf16-accumulating cross-entropy: 1129 on the H200), in 1536-column
# slabs on the CUDA backend (two buffers): dW GEMMs of 1536 x 4096 x 8192, still large enough for the tensor cores.
_GPU_LOSS_SLAB_BYTES = 48 * _MIB
# Below this many rows the dW accumulation (read + write of V·H fp32 per chunk)
# costs as much as the chunk's matmul (2·rows·V·H flops): keep chunks above it.
_MIN_ROWS = {"cpu": 32, "cuda": 128}
# Chunk rows (slab columns) are a multiple of this once that large. On the GPU a chunk is a GEMM's M (a slab's
# N): Hopper's bf16 cuBLAS kernels tile it by 128 or 256, so an 832-row chunk (16384 x 151936 at 256 MiB) would
# leave a quarter of its last 256-row tile idle; at that shape Liger-Kernel's 512-row chunks ran the no-grad
# forward 9% faster than ours (H200, NOTES.md), where at 1024-row chunks (V = 128256) ours was the faster.
_ALIGN_ROWS = {"cpu": 64, "cuda": 256}


def chunk_rows(n: int, row_bytes: int, budget: int, min_rows: int, free_rows: int = 0, cap_bytes: int = 0,
               align: int = 64) -> int:
    """Rows per chunk: ``budget // row_bytes`` (at least ``min_rows``, and at least ``free_rows``), a multiple of
    ``align`` once that large (else of 64), never more than ``n`` nor (with ``cap_bytes``) more than
    ``cap_bytes // row_bytes``."""
    row_bytes = max(1, row_bytes)
    rows = max(budget // row_bytes, min_rows, free_rows)
    if cap_bytes > 0:
        rows = min(rows, max(cap_bytes // row_bytes, min_rows))
    for step in (align, 64):
        if rows >= step:
            rows -= rows % step  # GEMM-friendly: whole tiles
            break
    return int(max(1, min(n, rows)))


def auto_chunk_size(
    n: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device, weight_grad_cast: bool = False,
    buffers: int = 1,
) -> int:
    """Rows per chunk so one chunk of logits takes ~32 MiB (CPU) or 64-256 MiB (GPU, by free memory).

    ``hidden_size`` matters through the chunk's own matmul, which is efficient
    once rows reach ``_MIN_ROWS``, and through ``weight_grad_cast``: when the
    loop accumulates a 16-bit weight's gradient in float32 and casts it at the
    end, the cast briefly holds both (``V·H·(4 + 2)`` bytes), so on the GPU a
    chunk of logits up to the size of the cast's output (``hidden_size`` rows
    of 16-bit logits, as big as the weight) adds nothing to the peak. Fewer,
    larger chunks matter there: every chunk's dW GEMM reads and writes the whole
    float32 accumulator (``8·V·H`` bytes, about 1.4 ms at V = 128256, H = 4096
    on an H100), which at 1024-row chunks costs as much as its arithmetic.
    ``buffers``: chunk-sized buffers live at once (2 when dlogits cannot
    overwrite the logits: the CUDA backend), which share that allowance.
    Capped at a quarter of the free memory. A chunk never exceeds ``n`` rows.
    """
    if n <= 0:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(1, vocab * itemsize)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 16, _GPU_CHUNK_BYTES[0]), _GPU_CHUNK_BYTES[1])
        # the cast's bytes cover `buffers` chunk-sized buffers (2 on the CUDA backend: logits + dlogits)
        free_rows = (vocab * hidden_size * itemsize) // (row_bytes * max(1, buffers)) if weight_grad_cast else 0
        return chunk_rows(n, row_bytes, budget, _MIN_ROWS["cuda"], free_rows, free // 4, _ALIGN_ROWS["cuda"])
    return chunk_rows(n, row_bytes, _CPU_CHUNK_BYTES, _MIN_ROWS["cpu"])


def _chunk(
    n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, chunk_size: int, weight_grad_cast: bool = False,
    buffers: int = 1,
) -> int:
    if chunk_size > 0:
        return int(min(chunk_size, max(n, 1)))
    return auto_chunk_size(n, h, v, dtype, device, weight_grad_cast, buffers)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, backend: str):
    """``logits[c, V]``, ``targets[c]`` -> ``(logp, entropy, lse)`` ``[c]`` via the backend's kernel."""
    rows = logits.unsqueeze(0)
    tgt = targets.unsqueeze(0).contiguous()
    if backend in ("cpu", "cuda"):  # the compiled op dispatches on the device
        out = torch.ops.rlhf_kernels_C.logprobs_fwd(rows, tgt, temperature, ignore_index)
    elif backend == "triton":
        from ..triton.logprobs import logprobs_fwd as triton_fwd

        out = triton_fwd(rows, tgt, temperature, ignore_index)
    else:
        out = _torch_fwd(rows, tgt, temperature, ignore_index)
    return tuple(t.reshape(-1) for t in out)


def _kernel_bwd(g_logp, g_ent, logits, targets, lse, entropy, temperature: float, ignore_index: int, backend: str,
                out: torch.Tensor) -> torch.Tensor:
    """``dlogits[c, V]`` (logits' dtype) of ``Σ g_logp·logp + g_ent·entropy``, written into ``out`` and returned.

    ``out`` is ``[c, V]`` with unit vocab stride (any row stride). It may be
    ``logits`` itself (see ``_grad_buffer``): the C++ CPU and Triton kernels
    read each element before writing it, from the same thread / program.
    """
    rows, out3 = logits.unsqueeze(0), out.unsqueeze(0)
    args = [t.unsqueeze(0).contiguous() for t in (g_logp, g_ent, targets, lse, entropy)]
    if backend in ("cpu", "cuda"):
        torch.ops.rlhf_kernels_C.logprobs_bwd_out(
            args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index, out3
        )
    elif backend == "triton":
        from ..triton.logprobs import logprobs_bwd as triton_bwd

        triton_bwd(args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index, out3)
    else:
        out3.copy_(_torch_bwd(args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index))
    return out


# Rows of a chunk buffer start 16-byte aligned (a multiple of 64 elements apart) when V is not a
# multiple of 8: cuBLAS's fast GEMMs (TMA on Hopper) need 16-byte leading dimensions (at V = 50257 the
# unaligned bf16 logits GEMM ran at ~110 TFLOP/s on an H100 against ~800 aligned). They need an aligned
# extent along V as well, which _linear_gemm gives by splitting each GEMM at the last whole vector.
_ROW_ALIGN = 64


def _row_buffer(rows: int, v: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``[rows, V]`` view of an uninitialised ``[rows, round_up(V, 64)]`` buffer whose padding columns are zero, or
    ``None`` when ``V % 8 == 0`` (then a plain contiguous chunk is already aligned and ``F.linear`` keeps its fused
    bias epilogue).

    Why zero the padding, which nothing writes or means to read: oneDNN's AMX bf16 GEMM (torch's CPU matmul on
    Xeons since Sapphire Rapids, oneDNN up to 3.14: uxlfoundation/oneDNN#5717) loads a whole 32-wide K tile past a
    row's last column and relies on the other operand's zero padding to cancel it. In ``dlogits @ weight`` that tail
    is this padding; NaN left there by earlier tensors made ``NaN·0`` and whole rows of the hidden states' gradient
    NaN (about half the rows at 96 x 301 in bf16; ``tests/ops/test_linear.py``)."""
    if v % 8 == 0:
        return None
    padded = (v + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN
    buffer = torch.empty((rows, padded), dtype=like.dtype, device=like.device)
    buffer[:, v:].zero_()  # rows x < 64 elements: a few microseconds even at 16K rows on a GPU
    return buffer[:, :v]


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """``hidden_c @ weight.T (+ bias)`` ``[c, V]``: into the first ``c`` rows of ``buffer`` when there is one."""
    if buffer is None:
        return F.linear(hidden_c, weight, bias)
    logits = buffer[: hidden_c.shape[0]]
    logits_gemm(hidden_c, weight, bias, logits)  # an unaligned V in two GEMMs (_linear_gemm)
    return logits


def _chunk_buffers(backend: str) -> int:
    """Chunk-sized buffers a loop holds: 1 where ``dlogits`` overwrite the logits (dead once the gradient is
    written), 2 on the CUDA backend, whose kernels declare their pointers ``__restrict__``."""
    return 2 if backend == "cuda" else 1


def _grad_buffer(logits: torch.Tensor, backend: str, spare: Optional[torch.Tensor]) -> torch.Tensor:
    """Where a chunk's ``dlogits`` go (``_chunk_buffers``): over its ``logits``, or the first rows of
    ``spare`` (an aligned ``_row_buffer``) or a fresh one (aligned as well: the gradient GEMMs read it) when a
    second buffer is needed."""
    if _chunk_buffers(backend) == 1:
        return logits
    if spare is None:
        spare = _row_buffer(logits.shape[0], logits.shape[1], logits)
    return spare[: logits.shape[0]] if spare is not None else torch.empty_like(logits)


def _accumulator(n: int, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A float32 (float64) gradient buffer shaped like ``like`` (``[V, H]`` for the weight, ``[N, H]`` for the
    hidden states): uninitialised, as the first chunk's GEMM writes it whole (``accumulate_mm``); zeros when there
    is no chunk (``N = 0``)."""
    make = torch.empty if n > 0 else torch.zeros
    return make(like.shape, dtype=acc, device=like.device)


def _apply_chunk_grad(dlogits, weight, hidden_c, grad_hidden, grad_weight, grad_bias, acc, first: bool) -> None:
    """One chunk's share of the gradients from its ``dlogits[n, V]``: ``dX = dlogits @ W`` into
    ``grad_hidden[n, H]`` (a slice of the full buffer), ``dW += dlogits.T @ X`` (``dW =`` for the
    ``first`` chunk, so the accumulator needs no zero-fill) and ``db += Σ dlogits`` (accumulated in
    ``acc``); a ``None`` buffer is skipped."""
    if grad_hidden is not None:
        grad_hidden_gemm(grad_hidden, dlogits, weight, True)
    if grad_weight is not None:
        grad_weight_gemm(grad_weight, dlogits, hidden_c, first)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=acc)


def _in_param_dtypes(grad_weight, grad_bias, weight, bias, need_weight: bool, need_bias: bool):
    """``(grad_weight, grad_bias)`` cast from their float32 (float64) accumulation to ``weight``'s and ``bias``'s
    dtypes; a gradient not needed (an empty ``[0]`` tensor) is left as it is."""
    if need_weight and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_weight, grad_bias


def slab_columns(n: int, vocab: int, dtype: torch.dtype, device: torch.device, chunk_size: int,
                 buffers: int = 1, gpu_bytes: int = _GPU_SLAB_BYTES) -> int:
    """Vocabulary columns per slab of ``chunk_by="vocab"``: ``chunk_size`` when given, else as many as keep
    ``buffers`` ``[N, cols]`` slabs of logits within 32 MiB (CPU) or ``gpu_bytes`` (GPU: 96 MiB, the losses' 48);
    a multiple of 64 (GPU: 256) once that large, at most ``vocab``. A slab's weight gradient needs no buffer of
    its own: its GEMM writes straight into ``grad_weight`` (``_linear_slabs._slab_gradients``)."""
    if chunk_size > 0:
        return int(min(chunk_size, max(vocab, 1)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    col_bytes = n * itemsize * max(1, buffers)
    budget = gpu_bytes if device.type == "cuda" else _CPU_CHUNK_BYTES
    return chunk_rows(vocab, col_bytes, budget, 64, align=_ALIGN_ROWS.get(device.type, 64))


@contextlib.contextmanager
def float32_gemm_reduction(operand: torch.Tensor):
    """Within it, cuBLAS sums a 16-bit GEMM only in float32, so each output element is rounded once.

    torch lets cuBLAS reduce a bf16 / fp16 GEMM's split-K partial sums in the
    output dtype (``torch.backends.cuda.matmul.allow_{bf16,fp16}_reduced_precision_reduction``,
    on by default). The vocabulary slabs write each slab's weight gradient
    ``dlogits_s.T @ hidden`` (a sum over all ``N`` tokens) straight into the
    16-bit ``grad_weight``, which the fused-linear contract wants accumulated in
    float32 and then cast: that holds only without the reduced-precision
    reduction, so it is turned off for the GEMM and restored after. (The flags
    are process-wide; another thread's GEMM in that window is only summed more
    exactly.) A no-op on the CPU and for 32 / 64-bit operands.
    """
    matmul = torch.backends.cuda.matmul
    flag = {torch.bfloat16: "allow_bf16_reduced_precision_reduction",
            torch.float16: "allow_fp16_reduced_precision_reduction"}.get(operand.dtype)
    if not operand.is_cuda or flag is None or not getattr(matmul, flag, False):
        yield
        return
    setattr(matmul, flag, False)
    try:
        yield
    finally:
        setattr(matmul, flag, True)


def autocast_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(hidden, weight, bias, context)`` as ``F.linear`` sees them under ``torch.autocast``.

    Under autocast for ``hidden``'s device, the three are cast to the autocast
    dtype (float64 stays, as autocast leaves it) and ``context`` turns autocast
    off for the op's own work, so that every chunk's GEMMs run in that dtype
    (bf16 / fp16 tensor cores on a GPU) on every path (row chunks, vocabulary
    slabs, frozen head). Without it an fp32 model under autocast ran some of the
    op's matmuls in float32 (``torch.mm(..., out=)`` is not autocast) and others in
    bf16 (``F.linear`` is), depending on the path. Gradients reach fp32 leaves
    through the casts, as they do from ``F.linear``. Otherwise the inputs come
    back as they are with a null context.
    """
    if not isinstance(hidden, torch.Tensor):  # the argument checks that follow name it
        return hidden, weight, bias, contextlib.nullcontext()
    device_type = hidden.device.type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        enabled = False
    if not enabled:
        return hidden, weight, bias, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.float64 or not t.is_floating_point():
            return t
        return t.to(dtype)

    return cast(hidden), cast(weight), cast(bias), torch.autocast(device_type, enabled=False)


def _check_linear_args(hidden, weight, targets, bias, chunk_size, ignore_index) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("targets", targets, INDEX_DTYPES)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden must be [*, H] and weight [V, H] with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must be [V, H] with V >= 1 and H >= 1, got {tuple(weight.shape)}")
    check_same_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        check_same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
    check_chunk_size(chunk_size)
    check_integer("ignore_index", ignore_index)
    check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias)


def _promoted(hidden, weight, bias):
    """``hidden`` as ``[N, H]``, ``weight`` (unit stride along H) and ``bias`` in their common dtype."""
    dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    hidden2 = hidden.to(dtype).reshape(-1, hidden.shape[-1])
    weight2 = weight.to(dtype)
    if weight2.stride(-1) != 1:
        weight2 = weight2.contiguous()
    return hidden2, weight2, None if bias is None else bias.to(dtype)
