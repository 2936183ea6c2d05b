"""Fused-linear ops: log-probs, entropy, the PPO loss and the SFT loss from hidden states and the LM head.

``linear_logprobs(hidden, weight, targets, bias)`` equals
``logprobs(hidden @ weight.T + bias, targets)`` but never materialises the
``[N, V]`` logits. Rows are processed ``chunk_size`` at a time:

    forward   logits_c = hidden_c @ weight.T (+ bias)       [c, V], input dtype
              (logp, entropy, lse)_c = logprobs kernel(logits_c)
    backward  logits_c recomputed, dlogits_c = logprobs backward kernel(...)
              grad_hidden_c  = dlogits_c @ weight
              grad_weight   += dlogits_c.T @ hidden_c        (fp32 accumulator)
              grad_bias     += dlogits_c.sum(0)              (fp32 accumulator)

Only ``hidden, weight, bias, targets, lse, entropy`` are saved (``O(N)``
beyond the inputs), so a training step holds one chunk of logits at a time
(the C++ CPU and Triton backward kernels overwrite the chunk's logits with its
``dlogits`` in place), and a no-grad call (reference / old-policy log-probs)
one chunk. When ``V`` is not a multiple of 8 (GPT-2's 50257) the chunk lives in
a buffer whose rows are padded to 64 elements, so that every GEMM sees 16-byte
aligned leading dimensions (cuBLAS falls back to far slower kernels
otherwise). The per-chunk reduction is the backend's fused ``logprobs`` kernel
(C++ CPU, Triton, or the PyTorch reference), called directly, so the loop has
no host synchronisation (targets are validated once, after the loop is queued).

Registered as the custom ops ``rlhf_kernels::linear_logprobs_fwd`` /
``linear_logprobs_bwd`` (fake impls + autograd) so ``torch.compile`` traces
them without graph breaks and ``torch.library.opcheck`` passes.

Forward that also produces the gradient (``linear_cross_entropy`` and
``linear_ppo_loss``). These losses are ``loss = Σ_i w_i·term_i`` with per-token
weights ``w`` that depend only on the mask, ``loss_agg`` and ``ignore_index``
(``aggregation_weights``: ``token-mean`` ``m/Σm``, ``seq-mean-*`` per sequence;
cross-entropy ``mean`` ``valid/count``, ``sum`` ``valid``), and each ``term_i``
depends on the logits only through ``(logp_i, entropy_i)``:

    cross-entropy  term = -logp                  ∂term/∂logp = -1, ∂term/∂H = 0
    PPO            term = pg + kl_coef·k - entropy_coef·entropy
                   ∂term/∂logp = _torch_dterm_dlogp(...), ∂term/∂H = -entropy_coef

So the upstream gradient of each token's ``(logp, entropy)``,
``g_logp = w·∂term/∂logp`` and ``g_ent = w·∂term/∂H``, is known as soon as the
chunk's log-probs are, and the forward (``rlhf_kernels::linear_loss_fused``)
finishes each chunk there and then:

    logits_c  = hidden_c @ weight.T (+ bias)                      matmul 1
    (logp, entropy, lse)_c = logprobs kernel(logits_c)
    dlogits_c = logprobs backward kernel(g_logp_c, g_ent_c, ...)
    grad_hidden_c  = dlogits_c @ weight                           matmul 2
    grad_weight   += dlogits_c.T @ hidden_c   (fp32 accumulator)  matmul 3
    grad_bias     += dlogits_c.sum(0)         (fp32 accumulator)

It keeps ``grad_hidden [N, H]``, ``grad_weight [V, H]``, ``grad_bias [V]``
(input dtypes) instead of the inputs, and the backward only multiplies them by
the scalar upstream gradient in place (nothing at all when it is 1, as in
``loss.backward()``: on CUDA a kernel skips the write after reading the scale on
the device) and hands them to autograd as the gradients themselves, not copies
(``ops/_forward_grads.py``: a saved tensor would make ``AccumulateGrad`` copy
``grad_weight``, 1 GB more at V = 128256, H = 4096 bf16). Three matmuls per
step, as in the materialised path, against four for the recompute path. Like
the CUDA ``ppo_loss`` fused path, the backward runs once (``retain_graph=True``
then a second backward raises).

The weights come from ``aggregation_weights`` in float32 (as in the CUDA
``ppo_loss`` fused path), so float64 inputs would get gradients exact to ~1e-7
relative only.

Vocabulary slabs (``chunk_by="vocab"``, or ``RLHF_KERNELS_LINEAR_CHUNK_BY=vocab``):
the same values and gradients, for ``linear_logprobs`` and the losses alike,
but the loop walks slabs of vocabulary columns over all rows (``_slab_forward``,
``_slab_gradients``, ``_vocab_slab_loss``). A slab's weight gradient is then one GEMM
over every token (float32 accumulation inside it, cast once) written into its
rows of ``grad_weight``: no ``[V, H]`` float32 accumulator (2.1 GB for a
128256 x 4096 bf16 head), at the cost of a second logits GEMM (4 matmuls);
``grad_hidden`` gets an ``[N, H]`` float32 accumulator instead. The default,
``chunk_by="auto"``, takes the row chunks unless that accumulator would not fit
in the GPU's free memory, and then the slabs, with a one-time warning.

Frozen head (``linear_logprobs_frozen_head``): when only ``hidden`` needs a
gradient (LoRA, a frozen LM head) and the entropy is not asked for, the log-prob's
gradient is ``g·(weight[y] - Σ_v p_v·weight_v) / T`` per row, a direction times
the upstream gradient, so the forward computes that direction per chunk (logits,
then ``dlogits @ weight``) and the backward only scales it: 2 matmuls, as the
materialised path, where recomputing takes 3.

Which path runs: the forward-with-gradient path when grad mode is on,
``hidden``, ``weight`` or ``bias`` requires grad, and none of them is float64,
unless ``grad_in_forward=False`` or ``RLHF_KERNELS_LINEAR_GRAD=recompute``;
``grad_in_forward=True`` / ``RLHF_KERNELS_LINEAR_GRAD=forward`` force it
whenever a gradient is needed (float64 included). No-grad calls, ``linear_logprobs`` (whose
upstream gradient is only known in backward) and
``linear_cross_entropy(reduction="none")`` always take the recompute path.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from ..reference import PPOLossOutput
from . import _forward_grads as forward_grads
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from .logprobs import IMPLEMENTED as _LOGPROBS_IMPLEMENTED
from .logprobs import _torch_bwd, _torch_fwd, _validate_targets, resolve_for, targets_checked_on_exit
from .ppo import _torch_dterm_dlogp, aggregation_weights, check_ppo_args, composed_ppo_terms, ppo_output

__all__ = ["linear_cross_entropy", "linear_logprobs", "linear_ppo_loss"]

IMPLEMENTED = tuple(_LOGPROBS_IMPLEMENTED)

_MIB = 1 << 20
# Logits bytes per chunk. On the CPU ~32 MiB keeps a chunk near the caches' reach
# while the dW GEMM (K = chunk rows) stays compute-bound; on the GPU 64-256 MiB
# (1/16 of free memory) is enough rows to saturate the tensor cores.
_CPU_CHUNK_BYTES = 32 * _MIB
_GPU_CHUNK_BYTES = (64 * _MIB, 256 * _MIB)
# chunk_by="vocab": bytes of a slab's buffers on the GPU. Every slab reads and writes grad_hidden's float32
# [N, H] accumulator (268 MB at N = 8192, H = 4096), so slabs too narrow cost bandwidth; too wide, memory.
_GPU_SLAB_BYTES = 128 * _MIB
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
# multiple of 8: cuBLAS's fast GEMMs (TMA on Hopper) need 16-byte leading dimensions, and at
# V = 50257 the unaligned bf16 logits GEMM ran at ~110 TFLOP/s on an H100 against ~800 aligned.
_ROW_ALIGN = 64


def _row_buffer(rows: int, v: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``[rows, V]`` view of an uninitialised ``[rows, round_up(V, 64)]`` buffer, or ``None`` when ``V % 8 == 0``
    (then a plain contiguous chunk is already aligned and ``F.linear`` keeps its fused bias epilogue)."""
    if v % 8 == 0:
        return None
    padded = (v + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN
    return torch.empty((rows, padded), dtype=like.dtype, device=like.device)[:, :v]


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  buffer: Optional[torch.Tensor]) -> torch.Tensor:
    """``hidden_c @ weight.T (+ bias)`` ``[c, V]``: into the first ``c`` rows of ``buffer`` when there is one."""
    if buffer is None:
        return F.linear(hidden_c, weight, bias)
    logits = buffer[: hidden_c.shape[0]]
    if bias is None:
        torch.mm(hidden_c, weight.t(), out=logits)
    else:  # one rounding, as F.linear: the bias joins the GEMM's float32 accumulation (beta = 1)
        torch.addmm(bias, hidden_c, weight.t(), out=logits)
    return logits


def _chunk_buffers(backend: str) -> int:
    """Chunk-sized buffers a loop holds: 1 where ``dlogits`` overwrite the logits (dead once the gradient is
    written), 2 on the CUDA backend, whose kernels declare their pointers ``__restrict__``."""
    return 2 if backend == "cuda" else 1


def _grad_buffer(logits: torch.Tensor, backend: str, spare: Optional[torch.Tensor]) -> torch.Tensor:
    """Where a chunk's ``dlogits`` go (``_chunk_buffers``): over its ``logits``, or the first rows of
    ``spare`` (an aligned ``_row_buffer``) or a fresh tensor when a second buffer is needed."""
    if _chunk_buffers(backend) == 1:
        return logits
    return spare[: logits.shape[0]] if spare is not None else torch.empty_like(logits)


def _accumulator(n: int, like: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """A float32 (float64) gradient buffer shaped like ``like`` (``[V, H]`` for the weight, ``[N, H]`` for the
    hidden states): uninitialised, as the first chunk's GEMM writes it whole (``_accumulate_mm``); zeros when there
    is no chunk (``N = 0``)."""
    make = torch.empty if n > 0 else torch.zeros
    return make(like.shape, dtype=acc, device=like.device)


def _apply_chunk_grad(dlogits, weight, hidden_c, grad_hidden, grad_weight, grad_bias, acc, first: bool) -> None:
    """One chunk's share of the gradients from its ``dlogits[n, V]``: ``dX = dlogits @ W`` into
    ``grad_hidden[n, H]`` (a slice of the full buffer), ``dW += dlogits.T @ X`` (``dW =`` for the
    ``first`` chunk, so the accumulator needs no zero-fill) and ``db += Σ dlogits`` (accumulated in
    ``acc``); a ``None`` buffer is skipped."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden)
    if grad_weight is not None:
        _accumulate_mm(grad_weight, dlogits.t(), hidden_c, first)
    if grad_bias is not None:
        grad_bias += dlogits.sum(0, dtype=acc)


def _accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out (+)= a @ b`` in ``out``'s dtype (float32 / float64) whatever the operands' dtype: the weight
    gradient ``dlogits.T @ hidden_c`` of each chunk, or a vocabulary slab's ``dlogits @ weight_s`` share of
    the hidden states' gradient.

    ``first``: ``out`` is uninitialised and gets the product (the GEMM then
    neither reads it nor needs it zeroed: for the weight gradient at V = 128256,
    H = 4096 that is two 2.1 GB passes saved).
    """
    if a.dtype != out.dtype:
        if a.is_cuda:
            # bf16 / fp16 tensor-core GEMM writing / accumulating straight into the fp32 buffer (no fp32 copies).
            try:
                if first:
                    torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
                else:
                    torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, out=out)
                return
            except (AttributeError, RuntimeError, NotImplementedError):  # torch without the mixed-dtype GEMMs
                pass
        # CPU (no mixed-dtype GEMM): one chunk-sized upcast of each operand.
        a, b = a.to(out.dtype), b.to(out.dtype)
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


@torch.library.custom_op("rlhf_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    chunk_by: str = "rows",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden[N, H]``, ``weight[V, H]``, ``targets[N]`` int64, ``bias[V]`` -> ``(logp, entropy, lse)`` ``[N]``.

    ``chunk_size`` 0 picks the chunk automatically. Outputs are float32
    (float64 for float64 inputs). One chunk of logits exists at a time: rows of
    it, or with ``chunk_by="vocab"`` a slab of columns over all rows
    (``_slab_forward``).
    """
    if chunk_by == "vocab":
        out = _slab_forward(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend)
        _validate_targets(targets, weight.shape[0], ignore_index, "linear_logprobs")
        return out
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = _stats_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=dtype)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size)
    buffer = _row_buffer(c, v, hidden)
    for s in range(0, n, c):
        e = min(n, s + c)
        logits = _chunk_logits(hidden[s:e], weight, bias, buffer)
        out = _kernel_fwd(logits, targets[s:e], temperature, ignore_index, backend)
        del logits
        for dst, src in zip((logp, entropy, lse), out):
            dst[s:e].copy_(src)
    _validate_targets(targets, v, ignore_index, "linear_logprobs")
    return logp, entropy, lse


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend, chunk_by="rows"):
    dtype = _stats_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in range(3))


@torch.library.custom_op("rlhf_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_by: str = "rows",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden[N, H], grad_weight[V, H], grad_bias[V])`` in the inputs' dtype, recomputing the logits per chunk.

    A gradient that is not needed comes back as an empty ``[0]`` tensor and is
    not computed. ``grad_weight`` / ``grad_bias`` are accumulated in float32
    (float64 for float64 inputs) across chunks, then cast. ``chunk_by="vocab"``:
    over vocabulary slabs instead (``_slab_gradients``: each slab's weight
    gradient one GEMM over all tokens, ``grad_hidden`` accumulated in float32).
    """
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    stats = lse.dtype
    g_logp = grad_logp.to(stats)
    g_ent = grad_entropy.to(stats)
    if chunk_by == "vocab":
        grad_hidden, grad_weight, grad_bias = _slab_gradients(
            g_logp, g_ent, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size, backend,
            need_hidden, need_weight, need_bias,
        )
        if need_bias and bias is not None and grad_bias.dtype != bias.dtype:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = _accumulator(n, weight, acc) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    if need_hidden or need_weight or need_bias:
        c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, need_weight and acc != weight.dtype,
                   _chunk_buffers(backend))
        buffer = _row_buffer(c, v, hidden)
        spare = _row_buffer(c, v, hidden) if _chunk_buffers(backend) == 2 else None
        for s in range(0, n, c):
            e = min(n, s + c)
            hidden_c = hidden[s:e]
            logits = _chunk_logits(hidden_c, weight, bias, buffer)
            dlogits = _kernel_bwd(
                g_logp[s:e], g_ent[s:e], logits, targets[s:e], lse[s:e], entropy[s:e], temperature, ignore_index,
                backend, _grad_buffer(logits, backend, spare),
            )
            del logits
            _apply_chunk_grad(
                dlogits, weight, hidden_c, grad_hidden[s:e] if need_hidden else None,
                grad_weight if need_weight else None, grad_bias if need_bias else None, acc, s == 0,
            )
            del dlogits
    if need_weight and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


@linear_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
      backend, need_hidden, need_weight, need_bias, chunk_by="rows"):
    grad_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    grad_bias = weight.new_empty(weight.shape[:1], dtype=bias_dtype) if need_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend, *chunk_by = inputs
    _, entropy, lse = output
    ctx.has_bias = bias is not None
    saved = (hidden, weight, targets, lse, entropy) + ((bias,) if ctx.has_bias else ())
    ctx.save_for_backward(*saved)
    ctx.scalars = (temperature, ignore_index, chunk_size, backend, chunk_by[0] if chunk_by else "rows")


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    # lse is an internal statistic saved for backward; it is not differentiable.
    hidden, weight, targets, lse, entropy, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bool(ctx.has_bias and ctx.needs_input_grad[3])
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    temperature, ignore_index, chunk_size, backend, chunk_by = ctx.scalars
    gh, gw, gb = linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
        backend, need_hidden, need_weight, need_bias, chunk_by,
    )
    return (
        gh if need_hidden else None,
        gw if need_weight else None,
        None,
        gb if need_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------- frozen head: the hidden states' gradient in the forward


@torch.library.custom_op("rlhf_kernels::linear_logprobs_frozen_head", mutates_args=())
def linear_logprobs_frozen_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp[N], direction[N, H])`` for a head that needs no gradient (LoRA, a frozen LM head), float32
    (float64 for float64 inputs).

    With ``p = softmax(z)``, ``z = (hidden @ weight.T + bias) / T``, the log-prob's
    gradient with respect to a row of ``hidden`` is its upstream gradient times
    a direction that does not depend on it::

        ∂logp_i/∂hidden_i = (onehot(y_i) - p_i) @ weight / T = (weight[y_i] - Σ_v p_iv·weight_v) / T

    So each row chunk computes its logits (matmul 1), its log-probs, its
    ``dlogits = (onehot - p) / T`` (the log-prob backward kernel with
    ``g_logp = 1``, written over the logits) and ``direction_c = dlogits @ weight``
    (matmul 2, float32 accumulation), and the backward is ``grad_hidden =
    grad_logp·direction``: 2 matmuls in all, as the materialised path, where
    recomputing the logits in backward takes 3. ``direction`` is 0 for ignored
    rows. Only ``hidden`` is differentiable.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    stats = _stats_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=stats)
    direction = _accumulator(n, hidden, stats)
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, buffers=_chunk_buffers(backend))
    buffer = _row_buffer(c, v, hidden)
    spare = _row_buffer(c, v, hidden) if _chunk_buffers(backend) == 2 else None
    for s in range(0, n, c):
        e = min(n, s + c)
        targets_c = targets[s:e]
        logits = _chunk_logits(hidden[s:e], weight, bias, buffer)
        lp, ent, lse = _kernel_fwd(logits, targets_c, temperature, ignore_index, backend)
        logp[s:e].copy_(lp)
        ones = torch.ones_like(lp)
        dlogits = _kernel_bwd(ones, torch.zeros_like(lp), logits, targets_c, lse, ent, temperature, ignore_index,
                              backend, _grad_buffer(logits, backend, spare))
        del logits
        _accumulate_mm(direction[s:e], dlogits, weight, True)
        del dlogits
    _validate_targets(targets, v, ignore_index, "linear_logprobs")
    return logp, direction


@linear_logprobs_frozen_head.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend):
    stats = _stats_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[:1], dtype=stats), hidden.new_empty(hidden.shape, dtype=stats)


def _frozen_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.hidden_dtype = inputs[0].dtype


def _frozen_backward(ctx, grad_logp, unused):
    (direction,) = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0] and grad_logp is not None:
        grad_hidden = (direction * grad_logp.to(direction.dtype).unsqueeze(-1)).to(ctx.hidden_dtype)
    return (grad_hidden,) + (None,) * 7


linear_logprobs_frozen_head.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


def _frozen_head_path(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], return_entropy: bool,
                      chunk_by: str) -> bool:
    """``linear_logprobs_frozen_head`` serves the call: only ``hidden`` needs a gradient (neither ``weight`` nor
    ``bias``), the entropy is not returned (its gradient would need a second direction: as many matmuls as
    recomputing), and the row chunks are in use (a direction needs each row's whole log-sum-exp first)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and not (bias is not None and bias.requires_grad) and not return_entropy and chunk_by == "rows")


# ------------------------------------------------------------- forward that also produces the gradient

# RLHF_KERNELS_LINEAR_GRAD: where linear_cross_entropy / linear_ppo_loss compute their gradient.
LINEAR_GRAD_PATHS = ("auto", "forward", "recompute")
_LOSS_KINDS = ("nll", "ppo")


def linear_grad_path() -> str:
    """The ``RLHF_KERNELS_LINEAR_GRAD`` setting (``auto`` when unset)."""
    value = os.environ.get("RLHF_KERNELS_LINEAR_GRAD", "auto").strip().lower() or "auto"
    if value not in LINEAR_GRAD_PATHS:
        raise ValueError(f"RLHF_KERNELS_LINEAR_GRAD must be one of {LINEAR_GRAD_PATHS}, got {value!r}")
    return value


LINEAR_CHUNK_BY = ("auto", "rows", "vocab")
# chunk_by="auto" weighs the row path's float32 accumulator against free memory on these devices only (the CPU's
# free memory is not the allocator's to count): rows there. Tests widen it.
AUTO_CHUNK_DEVICES = ("cuda",)
# The share of the device's free memory the row path's accumulator may take under chunk_by="auto".
_AUTO_ROWS_SHARE = 0.9
_auto_fallback_warned = False


def _chunk_by_setting(chunk_by: Optional[str]) -> str:
    """``chunk_by`` as given, else ``RLHF_KERNELS_LINEAR_CHUNK_BY``, else ``"auto"``; checked against ``LINEAR_CHUNK_BY``."""
    value = chunk_by if chunk_by is not None else os.environ.get("RLHF_KERNELS_LINEAR_CHUNK_BY", "")
    value = value.strip().lower() or "auto"
    if value not in LINEAR_CHUNK_BY:
        raise ValueError(f"chunk_by (or RLHF_KERNELS_LINEAR_CHUNK_BY) must be one of {LINEAR_CHUNK_BY}, got {value!r}")
    return value


def linear_chunk_by(chunk_by: Optional[str], weight: Optional[torch.Tensor] = None) -> str:
    """``"rows"`` or ``"vocab"``: ``chunk_by`` of the linear losses, else ``RLHF_KERNELS_LINEAR_CHUNK_BY``, else
    ``"auto"``, which takes the row chunks (3 matmuls, the fastest) unless their ``[V, H]`` float32 weight-gradient
    accumulator would not fit in the device's free memory, and then the vocabulary slabs (no such buffer, 4 matmuls)
    with a one-time warning, rather than running out of memory. ``weight``: the LM head whose gradient the loop
    computes; ``None`` when none is computed (the setting is still checked; ``"auto"`` is then ``"rows"``)."""
    value = _chunk_by_setting(chunk_by)
    return value if value != "auto" else _auto_chunk_by(weight)


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
    needs_accumulator = (weight is not None and weight.requires_grad and _acc_dtype(weight.dtype) != weight.dtype
                         and weight.device.type in AUTO_CHUNK_DEVICES)
    return "vocab" if needs_accumulator and chunk_size is None else "rows"


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
    if (weight is None or not weight.requires_grad or weight.device.type not in AUTO_CHUNK_DEVICES
            or _acc_dtype(weight.dtype) == weight.dtype or torch.compiler.is_compiling()):
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


def _grad_in_forward(grad_in_forward: Optional[bool], *leaves: Optional[torch.Tensor]) -> bool:
    """True when the loss should take the forward-with-gradient path (module docstring)."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)):
        return False
    if grad_in_forward is not None:
        return bool(grad_in_forward)
    path = linear_grad_path()
    if path == "auto":  # float64 is for checks: its weights would be float32-exact only
        return all(t is None or t.dtype != torch.float64 for t in leaves)
    return path == "forward"


def _loss_weights(mask: torch.Tensor, loss_agg: str, dtype: torch.dtype) -> torch.Tensor:
    """``w = ∂loss/∂term`` per token, flattened: ``aggregation_weights`` (float32, as the CUDA ``ppo_loss``
    fused path), or the mask itself for ``"sum"``; O(N) on the device, no host synchronisation."""
    w = mask.to(dtype) if loss_agg == "sum" else aggregation_weights(mask, loss_agg).to(dtype)
    return w.reshape(-1)


def _token_grads(lp, w_c, loss, old_logp, advantages, ref_logp, s, e, kl_coef, kl_estimator, entropy_coef,
                 clip_low, clip_high, dual_clip):
    """``(g_logp, g_ent) = (w·∂term/∂logp, w·∂term/∂H)`` of tokens ``[s, e)`` from their log-probs ``lp``."""
    if loss == "nll":
        return -w_c, torch.zeros_like(w_c)
    ref_c = None if ref_logp is None else ref_logp[s:e]
    dterm, _ = _torch_dterm_dlogp(
        lp, old_logp[s:e], advantages[s:e], ref_c, kl_coef, kl_estimator, clip_low, clip_high, dual_clip
    )
    return w_c * dterm, w_c * -entropy_coef


def _aggregate_terms(logp, entropy, w, mask, old_logp, advantages, ref_logp, loss, loss_agg, kl_coef, kl_estimator,
                     entropy_coef, clip_low, clip_high, dual_clip) -> torch.Tensor:
    """The loss value from the per-token ``(logp, entropy)``: ``Σ w·term`` (``"sum"``) or ``aggregate_loss``."""
    if loss == "nll":
        term = -logp
    else:
        term = reference.ppo_token_terms(
            logp, entropy, old_logp, advantages, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        )[0]
    if loss_agg == "sum":
        return (term * w).sum()
    return reference.aggregate_loss(term.reshape(mask.shape), mask, loss_agg)


def slab_columns(n: int, hidden_size: int, vocab: int, dtype: torch.dtype, weight_dtype: torch.dtype,
                 device: torch.device, chunk_size: int, buffers: int = 1) -> int:
    """Vocabulary columns per slab of ``chunk_by="vocab"``: ``chunk_size`` when given, else as many as keep
    ``buffers`` ``[N, cols]`` slabs of logits, and the slab's float32 weight gradient when the weight is 16-bit,
    within 32 MiB (CPU) or 128 MiB (GPU); a multiple of 64 (GPU: 256) once that large, at most ``vocab``."""
    if chunk_size > 0:
        return int(min(chunk_size, max(vocab, 1)))
    itemsize = torch.empty((), dtype=dtype).element_size()
    cast = hidden_size * 4 if _acc_dtype(weight_dtype) != weight_dtype else 0
    col_bytes = n * itemsize * max(1, buffers) + cast
    budget = _GPU_SLAB_BYTES if device.type == "cuda" else _CPU_CHUNK_BYTES
    return chunk_rows(vocab, col_bytes, budget, 64, align=_ALIGN_ROWS.get(device.type, 64))


def _slabs(n: int, h: int, weight: torch.Tensor, hidden: torch.Tensor, chunk_size: int, backend: str):
    """``[(s, e), ...]``: the vocabulary slabs of ``chunk_by="vocab"`` (``slab_columns`` wide)."""
    v = weight.shape[0]
    cols = slab_columns(n, h, v, hidden.dtype, weight.dtype, hidden.device, chunk_size, _chunk_buffers(backend))
    return [(s, min(v, s + cols)) for s in range(0, v, cols)]


def _slab_logits(hidden, weight, bias, targets, valid, s: int, e: int):
    """``(logits [N, e - s], in_slab [N])`` of columns ``[s, e)``: the slab's GEMM and whose target lies there."""
    n = hidden.shape[0]
    logits = _chunk_logits(hidden, weight[s:e], None if bias is None else bias[s:e], _row_buffer(n, e - s, hidden))
    return logits, valid & (targets >= s) & (targets < e)


def _slab_forward(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend):
    """Pass 1 of the vocabulary slabs: ``(logp, entropy, lse)`` ``[N]`` from one slab of logits at a time.

    With ``lse_s``, ``H_s`` the log-sum-exp and entropy of slab ``s`` alone::

        lse = logsumexp_s lse_s,  P_s = exp(lse_s - lse),  H = Σ_s P_s·(H_s - (lse_s - lse))
        logp = logp_in_slab(y) + (lse_{slab(y)} - lse)

    The kernel sees slab-local targets: the target's column in its slab, column
    0 for the other valid rows (whose log-prob is not used), and ``-1`` as the
    ignore index for ignored rows. ``logp`` and ``entropy`` are 0 for ignored
    rows; ``lse`` is the whole row's either way.
    """
    n, h = hidden.shape
    stats = _stats_dtype(hidden.dtype)
    slabs = _slabs(n, h, weight, hidden, chunk_size, backend)
    valid = targets != ignore_index
    unused = torch.full_like(targets, -1)
    slab_lse = hidden.new_empty((len(slabs), n), dtype=stats)
    slab_ent = torch.empty_like(slab_lse)
    lp_target = hidden.new_full((n,), float("nan"), dtype=stats)  # stays NaN for an out-of-range target
    lse_target = hidden.new_zeros((n,), dtype=stats)
    for i, (s, e) in enumerate(slabs):
        logits, in_slab = _slab_logits(hidden, weight, bias, targets, valid, s, e)
        y_local = torch.where(in_slab, targets - s, torch.where(valid, torch.zeros_like(targets), unused))
        lp, ent, lse = _kernel_fwd(logits, y_local, temperature, -1, backend)
        del logits
        slab_lse[i].copy_(lse)
        slab_ent[i].copy_(ent)
        lp_target = torch.where(in_slab, lp, lp_target)
        lse_target = torch.where(in_slab, lse, lse_target)
    row_lse = torch.logsumexp(slab_lse, dim=0)
    share = torch.exp(slab_lse - row_lse)  # P_s, the slab's probability mass
    per_slab = torch.where(share > 0, share * (slab_ent - (slab_lse - row_lse)), torch.zeros_like(share))
    zero = torch.zeros_like(row_lse)
    entropy = torch.where(valid, per_slab.sum(0), zero)
    logp = torch.where(valid, lp_target + (lse_target - row_lse), zero)
    return logp, entropy, row_lse


def _slab_gradients(g_logp, g_ent, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index,
                    chunk_size, backend, need_hidden, need_weight, need_bias):
    """Pass 2 of the vocabulary slabs: ``(grad_hidden, grad_weight, grad_bias)`` of ``Σ g_logp·logp + g_ent·H``
    from each slab's logits computed again, given the whole rows' ``lse`` and ``entropy`` ``[N]``::

        dlogits_s = logprobs backward kernel(logits_s)      (slab-local targets; one past the slab: no one-hot)
        grad_hidden += dlogits_s @ weight_s,  grad_weight_s = dlogits_s.T @ hidden,  grad_bias_s = Σ dlogits_s

    ``grad_hidden`` is accumulated in float32 (float64), each ``grad_weight_s`` is
    one GEMM over all ``N`` tokens cast once into its rows of ``grad_weight``
    (no ``[V, H]`` float32 accumulator), ``grad_bias`` stays float32 (float64);
    a gradient not needed is an empty ``[0]`` tensor.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    valid = targets != ignore_index
    unused = torch.full_like(targets, -1)
    dx = _accumulator(n, hidden, _acc_dtype(hidden.dtype)) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    cast = need_weight and acc != weight.dtype
    for i, (s, e) in enumerate(_slabs(n, h, weight, hidden, chunk_size, backend)):
        logits, in_slab = _slab_logits(hidden, weight, bias, targets, valid, s, e)
        y_local = torch.where(in_slab, targets - s, torch.where(valid, torch.full_like(targets, e - s), unused))
        dlogits = _kernel_bwd(g_logp, g_ent, logits, y_local, lse, entropy, temperature, -1, backend,
                              _grad_buffer(logits, backend, None))
        del logits
        if dx is not None:
            _accumulate_mm(dx, dlogits, weight[s:e], i == 0)
        if need_weight:
            dw = torch.empty((e - s, h), dtype=acc, device=weight.device) if cast else grad_weight[s:e]
            _accumulate_mm(dw, dlogits.t(), hidden, True)
            if cast:
                grad_weight[s:e].copy_(dw)
                del dw
        if need_bias:
            grad_bias[s:e] = dlogits.sum(0, dtype=acc)
        del dlogits
    grad_hidden = hidden.new_empty(0)
    if dx is not None:
        grad_hidden = dx if dx.dtype == hidden.dtype else dx.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def _vocab_slab_loss(hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index,
                     loss, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend,
                     need_hidden, need_weight, need_bias):
    """``linear_loss_fused`` over vocabulary slabs: ``(logp, entropy, grad_hidden, grad_weight, grad_bias)``
    (``grad_bias`` still in float32: ``linear_loss_fused`` casts it).

    No ``[V, H]`` float32 accumulator: each slab's weight gradient is one GEMM
    over all ``N`` tokens (float32 accumulation inside it, cast once), written
    into its rows of ``grad_weight``; the price is a second logits GEMM, 4
    matmuls in all. Extra memory: a slab of logits (two on CUDA), the slab's
    float32 weight gradient when the weight is 16-bit, and ``grad_hidden``'s
    float32 ``[N, H]`` accumulator. Pass 1 (``_slab_forward``) gives each row's
    ``(logp, entropy, lse)``, the loss's per-token upstream gradients follow from
    them, and pass 2 (``_slab_gradients``) computes the slabs' logits again for
    the gradients.
    """
    n = hidden.shape[0]
    logp, entropy, row_lse = _slab_forward(hidden, weight, targets, bias, temperature, ignore_index, chunk_size,
                                           backend)
    g_logp, g_ent = _token_grads(logp, w, loss, old_logp, advantages, ref_logp, 0, n, kl_coef, kl_estimator,
                                 entropy_coef, clip_low, clip_high, dual_clip)
    grads = _slab_gradients(g_logp, g_ent, hidden, weight, targets, bias, row_lse, entropy, temperature,
                            ignore_index, chunk_size, backend, need_hidden, need_weight, need_bias)
    return (logp, entropy) + grads


def _row_chunk_loss(hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index,
                    loss, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend,
                    need_hidden, need_weight, need_bias):
    """``linear_loss_fused`` over row chunks: ``(logp, entropy, grad_hidden, grad_weight, grad_bias)``, the weight
    and bias gradients still in float32 (``linear_loss_fused`` casts them). No gradient wanted: the forward only."""
    n, h = hidden.shape
    v = weight.shape[0]
    stats = _stats_dtype(hidden.dtype)
    acc = _acc_dtype(weight.dtype)
    logp = hidden.new_empty((n,), dtype=stats)
    entropy = torch.empty_like(logp)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = _accumulator(n, weight, acc) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    any_grad = need_hidden or need_weight or need_bias
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, need_weight and acc != weight.dtype,
               _chunk_buffers(backend))
    buffer = _row_buffer(c, v, hidden)
    spare = _row_buffer(c, v, hidden) if any_grad and _chunk_buffers(backend) == 2 else None
    for s in range(0, n, c):
        e = min(n, s + c)
        hidden_c, targets_c, w_c = hidden[s:e], targets[s:e], w[s:e]
        logits = _chunk_logits(hidden_c, weight, bias, buffer)
        lp, ent, lse = _kernel_fwd(logits, targets_c, temperature, ignore_index, backend)
        logp[s:e].copy_(lp)
        entropy[s:e].copy_(ent)
        if not any_grad:
            continue
        g_logp, g_ent = _token_grads(lp, w_c, loss, old_logp, advantages, ref_logp, s, e, kl_coef, kl_estimator,
                                     entropy_coef, clip_low, clip_high, dual_clip)
        dlogits = _kernel_bwd(g_logp, g_ent, logits, targets_c, lse, ent, temperature, ignore_index, backend,
                              _grad_buffer(logits, backend, spare))
        del logits
        _apply_chunk_grad(
            dlogits, weight, hidden_c, grad_hidden[s:e] if need_hidden else None,
            grad_weight if need_weight else None, grad_bias if need_bias else None, acc, s == 0,
        )
        del dlogits
    return logp, entropy, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("rlhf_kernels::linear_loss_fused", mutates_args=())
def linear_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: Optional[torch.Tensor],
    ref_logp: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    loss: str,
    loss_agg: str,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    chunk_size: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_by: str = "rows",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, logp, entropy, grad_hidden, grad_weight, grad_bias)`` with the gradients computed in the forward.

    ``hidden[N, H]``, ``weight[V, H]``, ``targets[N]`` int64, ``bias[V]``;
    ``mask`` in the loss's per-token shape (``[B, T]`` for ``seq-mean-*``,
    ``N`` elements); ``old_logp``, ``advantages``, ``ref_logp`` ``[N]`` in the
    statistics dtype (``loss="ppo"`` only). ``loss``: ``"nll"`` (``term = -logp``)
    or ``"ppo"`` (DESIGN.md §2's PPO term); ``loss_agg``: a ``reference.LOSS_AGG_MODES``
    entry or ``"sum"`` (``Σ mask·term``). ``loss`` is a scalar and ``logp``,
    ``entropy`` are ``[N]``, float32 (float64 for float64 inputs);
    ``grad_* = ∂loss/∂(hidden, weight, bias)`` for an upstream gradient of 1, in
    the inputs' dtypes (weight and bias accumulated in float32 across chunks),
    an empty ``[0]`` tensor where ``need_*`` is False. One chunk of logits
    exists at a time (``_kernel_bwd`` turns it into the chunk's ``dlogits`` in
    place on the C++ CPU and Triton backends; CUDA adds a second chunk).
    ``chunk_by="vocab"``: vocabulary slabs instead of row chunks (``_vocab_slab_loss``).
    """
    w = _loss_weights(mask, loss_agg, _stats_dtype(hidden.dtype))
    any_grad = need_hidden or need_weight or need_bias
    loop = _vocab_slab_loss if chunk_by == "vocab" and any_grad else _row_chunk_loss
    logp, entropy, grad_hidden, grad_weight, grad_bias = loop(
        hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index, loss, kl_coef,
        kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend, need_hidden, need_weight,
        need_bias,
    )
    value = _aggregate_terms(logp, entropy, w, mask, old_logp, advantages, ref_logp, loss, loss_agg, kl_coef,
                             kl_estimator, entropy_coef, clip_low, clip_high, dual_clip)
    _validate_targets(targets, weight.shape[0], ignore_index, "linear_cross_entropy or linear_ppo_loss")
    if need_weight and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return value, logp, entropy, grad_hidden, grad_weight, grad_bias


@linear_loss_fused.register_fake
def _(hidden, weight, targets, bias, mask, old_logp, advantages, ref_logp, temperature, ignore_index, loss, loss_agg,
      kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend, need_hidden,
      need_weight, need_bias, chunk_by="rows"):
    stats = _stats_dtype(hidden.dtype)
    value = hidden.new_empty((), dtype=stats)
    logp, entropy = (hidden.new_empty(hidden.shape[:1], dtype=stats) for _ in range(2))
    grad_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    grad_bias = weight.new_empty(weight.shape[:1], dtype=bias_dtype) if need_bias else weight.new_empty(0)
    return value, logp, entropy, grad_hidden, grad_weight, grad_bias


def _fused_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    need = (inputs[20], inputs[21], inputs[22] and inputs[3] is not None)
    forward_grads.keep(ctx, [t if wanted else None for t, wanted in zip(output[3:], need)])


def _fused_backward(ctx, g_loss, *unused):
    # The gradients were computed for an upstream gradient of 1 (module docstring), handed over without a copy.
    grads = forward_grads.hand_over(ctx, g_loss, "linear_loss_fused")
    return (grads[0], grads[1], None, grads[2]) + (None,) * 20


linear_loss_fused.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def _fused_loss(hidden, weight, targets, bias, mask, old_logp, advantages, ref_logp, *, temperature, ignore_index,
                loss, loss_agg, chunk_size, backend, chunk_by="rows", kl_coef=0.0, kl_estimator="k3",
                entropy_coef=0.0, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Promote and flatten as ``linear_logprobs`` does, then ``linear_loss_fused`` -> ``(loss, logp, entropy)``."""
    hidden2, weight2, bias2 = _promoted(hidden, weight, bias)
    chosen = resolve_for("linear_logprobs", hidden2, backend, IMPLEMENTED)
    stats = _stats_dtype(hidden2.dtype)
    per_token = [None if t is None else t.detach().reshape(-1).to(stats) for t in (old_logp, advantages, ref_logp)]
    value, logp, entropy, _, _, _ = linear_loss_fused(
        hidden2,
        weight2,
        targets.reshape(-1).long(),
        bias2,
        mask.detach(),
        *per_token,
        float(temperature),
        int(ignore_index),
        loss,
        loss_agg,
        float(kl_coef),
        kl_estimator,
        float(entropy_coef),
        float(clip_low),
        float(clip_high),
        None if dual_clip is None else float(dual_clip),
        0 if chunk_size is None else int(chunk_size),
        chosen,
        hidden.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        chunk_by,
    )
    lead = hidden.shape[:-1]
    return value, logp.reshape(lead), entropy.reshape(lead)


def _check_linear_args(hidden, weight, targets, bias, chunk_size) -> None:
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("targets", targets, INDEX_DTYPES)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden must be [*, H] and weight [V, H] with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    check_same_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        check_same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
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


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    chunk_by: Optional[str] = None,
):
    """``logprobs(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    With ``z = (hidden @ weight.T + bias) / temperature`` (computed in the
    input dtype, one chunk of rows at a time), ``lse = logsumexp(z)``,
    ``p = softmax(z)``::

        logp    = z[y] - lse            # [*], 0 where targets == ignore_index
        entropy = lse - Σ_v p_v·z_v     # [*]

    Backward recomputes each chunk's logits: ``dz = g_logp·(onehot(y) - p) -
    g_ent·p·(log p + entropy)``, ``dlogits = dz / temperature``,
    ``grad_hidden = dlogits @ weight``, ``grad_weight = Σ_chunks dlogits.T @
    hidden`` and ``grad_bias = Σ dlogits`` accumulated in float32, then cast to
    the parameter's dtype. When only ``hidden`` needs a gradient and the
    entropy is not returned (a frozen head, as under LoRA), the forward also
    computes each row's ``(weight[y] - Σ_v p_v·weight_v) / T`` (float32
    ``[N, H]``) and the backward scales it by the upstream gradient: 2 matmuls
    instead of 3 (``linear_logprobs_frozen_head``). With ``chunk_by="vocab"`` both passes walk slabs of
    vocabulary columns over all rows instead (``_slab_forward``,
    ``_slab_gradients``): each slab's weight gradient is one GEMM over every
    token, so there is no ``[V, H]`` float32 accumulator, and ``grad_hidden``
    is accumulated in float32 instead (``[N, H]``).

    Args:
        hidden: ``[*, H]`` float32 / bfloat16 / float16 (float64 for checks);
            any strides (flattened to ``[N, H]``).
        weight: ``[V, H]`` LM head. ``hidden`` and ``weight`` (and ``bias``)
            are promoted to a common dtype when they differ.
        targets: ``[*]`` int64 / int32 ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature: divides the logits, > 0.
        ignore_index: target value whose outputs and gradients are 0.
        return_entropy: also return the per-token entropy.
        chunk_size: rows per chunk (vocabulary columns per slab with
            ``chunk_by="vocab"``); ``None`` picks ~32 MiB of logits per chunk
            on the CPU and 64-256 MiB (by free memory) on the GPU.
        backend: ``"triton" | "cpu" | "torch"`` for the per-chunk reduction;
            ``None`` picks as ``rk.logprobs`` does.
        chunk_by: ``"rows"`` (row chunks), ``"vocab"`` (vocabulary slabs: the
            least memory when a 16-bit weight needs a gradient, the same 4
            matmuls), or ``"auto"`` (``None``: ``RLHF_KERNELS_LINEAR_CHUNK_BY``,
            else ``"auto"``): on the GPU the slabs when a 16-bit weight needs a
            gradient (the row chunks would hold a ``[V, H]`` float32
            accumulator), else the rows, as also when ``chunk_size`` is given
            (``logprobs_chunk_by``).
            The two are within 5% of each other on the CPU at GPT-2 size
            (``benchmarks/results/cpu-linear``).

    Returns:
        ``logp`` float32 ``[*]``, or ``(logp, entropy)`` when ``return_entropy``.
        Memory beyond inputs and outputs: one chunk of logits (two in backward,
        plus the float32 weight-gradient accumulator for bf16/fp16 weights, or
        with ``chunk_by="vocab"`` a slab's float32 weight gradient and the
        ``[N, H]`` float32 ``grad_hidden`` accumulator).
    """
    _check_linear_args(hidden, weight, targets, bias, chunk_size)
    temperature = check_positive("temperature", temperature)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    chunk_by = logprobs_chunk_by(chunk_by, weight if grad else None, chunk_size)
    lead = hidden.shape[:-1]
    hidden2, weight2, bias2 = _promoted(hidden, weight, bias)
    chosen = resolve_for("linear_logprobs", hidden2, backend, IMPLEMENTED)
    if _frozen_head_path(hidden, weight, bias, return_entropy, chunk_by):
        logp, _ = linear_logprobs_frozen_head(
            hidden2, weight2, targets.reshape(-1).long(), bias2, temperature, int(ignore_index),
            0 if chunk_size is None else int(chunk_size), chosen,
        )
        return logp.reshape(lead)
    logp, entropy, _ = linear_logprobs_fwd(
        hidden2,
        weight2,
        targets.reshape(-1).long(),
        bias2,
        temperature,
        int(ignore_index),
        0 if chunk_size is None else int(chunk_size),
        chosen,
        chunk_by,
    )
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


@targets_checked_on_exit
def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    grad_in_forward: Optional[bool] = None,
    chunk_by: Optional[str] = None,
) -> PPOLossOutput:
    """``rk.ppo_loss`` from hidden states and the LM head, never materialising the logits.

    ``logp, entropy = linear_logprobs(hidden, weight, targets, bias, return_entropy=True)``
    then, per token (DESIGN.md §2)::

        r    = exp(clamp(logp - old_logp, -20, 20))
        pg   = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
        pg   = min(pg, -A·dual_clip)            where A < 0 (when dual_clip is set)
        term = pg + kl_coef·k(logp, ref_logp) - entropy_coef·entropy

    aggregated over ``mask`` by ``loss_agg``. Shapes: ``hidden[B, T, H]``,
    ``weight[V, H]``, ``targets, old_logp, advantages, mask (, ref_logp)[B, T]``
    (``token-mean`` accepts any leading shape). Gradients flow to ``hidden``,
    ``weight`` and ``bias``.

    Gradient path (module docstring): when a gradient is needed the forward
    computes it, chunk by chunk, from ``loss = Σ w·term`` with
    ``w = aggregation_weights(mask, loss_agg)``::

        g_logp = w·∂term/∂logp      (clip / dual-clip sub-gradients as PyTorch autograd, plus kl_coef·∂k/∂logp)
        g_ent  = -w·entropy_coef
        dz     = g_logp·(onehot(y) - p) - g_ent·p·(log p + entropy),   dlogits = dz / temperature

    and the backward scales ``∂loss/∂(hidden, weight, bias)`` by the upstream
    gradient (3 matmuls in all). ``grad_in_forward=False`` (or
    ``RLHF_KERNELS_LINEAR_GRAD=recompute``) takes ``linear_logprobs``'s path
    instead: logits recomputed in backward, 4 matmuls. ``chunk_by="vocab"`` (or
    ``RLHF_KERNELS_LINEAR_CHUNK_BY=vocab``) computes that gradient over
    vocabulary slabs instead of row chunks: no ``[V, H]`` float32 weight-gradient
    accumulator (the least memory), 4 matmuls (``_vocab_slab_loss``; the
    recompute path walks slabs too); with it, ``chunk_size`` is the slab's width
    in vocabulary columns. ``"rows"`` forces
    the row chunks; ``"auto"`` (the default) takes them unless their accumulator
    would not fit in the GPU's free memory (``linear_chunk_by``).

    Returns:
        ``PPOLossOutput(loss, logp, entropy, kl, clip_frac, approx_kl)`` as ``rk.ppo_loss``.
    """
    _check_linear_args(hidden, weight, targets, bias, chunk_size)
    lead = hidden.shape[:-1]
    check_ppo_args(
        lead, "hidden.shape[:-1]", "hidden", hidden, old_logp, advantages, mask, ref_logp,
        kl_coef=kl_coef, kl_estimator=kl_estimator, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        loss_agg=loss_agg,
    )
    if loss_agg != "token-mean" and len(lead) < 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs hidden of shape [B, T, H], got {tuple(hidden.shape)}")

    options = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low,
                   clip_high=clip_high, dual_clip=None if dual_clip is None else float(dual_clip))
    grad_path = _grad_in_forward(grad_in_forward, hidden, weight, bias)
    if grad_path:
        temperature = check_positive("temperature", temperature)
        loss, logp, entropy = _fused_loss(
            hidden, weight, targets, bias, mask, old_logp, advantages, ref_logp, temperature=temperature,
            ignore_index=ignore_index, loss="ppo", loss_agg=loss_agg, chunk_size=chunk_size, backend=backend,
            chunk_by=linear_chunk_by(chunk_by, weight), **options,
        )
    else:
        loss = None
        logp, entropy = linear_logprobs(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
            chunk_size=chunk_size, backend=backend, chunk_by=chunk_by,
        )
    term, kl, clipped = composed_ppo_terms(logp, entropy, old_logp, advantages, ref_logp, **options)
    return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg, loss=loss)


@targets_checked_on_exit
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    grad_in_forward: Optional[bool] = None,
    chunk_by: Optional[str] = None,
) -> torch.Tensor:
    """SFT cross-entropy ``-logp`` from hidden states and the LM head, never materialising the logits.

    ``nll = -linear_logprobs(hidden, weight, targets, bias, temperature=temperature)`` (0 where
    ``targets == ignore_index``); ``reduction="mean"`` divides by the number
    of non-ignored targets (0, not NaN, when there are none), ``"sum"`` sums,
    ``"none"`` returns float32 ``nll[*]``.

    Gradient path (module docstring): for ``"mean"`` / ``"sum"`` with a gradient
    needed, the forward computes it: ``loss = Σ w·(-logp)`` with
    ``w = valid / count`` (``mean``) or ``valid`` (``sum``), so per chunk
    ``dlogits = -w·(onehot(y) - p)`` (0 for ignored targets), then
    ``grad_hidden``, ``grad_weight``, ``grad_bias`` (3 matmuls in all); the
    backward scales them by the upstream gradient. ``"none"``,
    ``grad_in_forward=False`` or ``RLHF_KERNELS_LINEAR_GRAD=recompute``:
    ``linear_logprobs``'s recompute path (4 matmuls). ``chunk_by="vocab"``: the
    gradient over vocabulary slabs, with no ``[V, H]`` float32 accumulator (see
    ``linear_ppo_loss``).
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    grad_path = reduction != "none" and _grad_in_forward(grad_in_forward, hidden, weight, bias)
    if grad_path:
        _check_linear_args(hidden, weight, targets, bias, chunk_size)
        temperature = check_positive("temperature", temperature)
        valid = targets != ignore_index
        loss, _, _ = _fused_loss(
            hidden, weight, targets, bias, valid, None, None, None, temperature=temperature,
            ignore_index=ignore_index, loss="nll", loss_agg="token-mean" if reduction == "mean" else "sum",
            chunk_size=chunk_size, backend=backend, chunk_by=linear_chunk_by(chunk_by, weight),
        )
        return loss
    logp = linear_logprobs(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size,
        backend=backend, chunk_by=chunk_by,
    )
    nll = -logp
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    count = (targets != ignore_index).sum().to(nll.dtype)
    return reference._safe_divide(nll.sum(), count)
