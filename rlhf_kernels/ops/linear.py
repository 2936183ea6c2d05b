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
beyond the inputs), so a training step holds one chunk of logits (plus one of
``dlogits``) at a time, and a no-grad call (reference / old-policy log-probs)
one chunk. The per-chunk reduction is the backend's fused ``logprobs`` kernel
(C++ CPU, Triton, or the PyTorch reference), called directly, so the loop has
no host synchronisation (targets are validated once, up front).

Registered as the custom ops ``rlhf_kernels::linear_logprobs_fwd`` /
``linear_logprobs_bwd`` (fake impls + autograd) so ``torch.compile`` traces
them without graph breaks and ``torch.library.opcheck`` passes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import reference
from ..reference import PPOLossOutput
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
from .logprobs import _torch_bwd, _torch_fwd, _validate_targets, resolve_for
from .ppo import check_ppo_args, composed_ppo_terms, ppo_output

__all__ = ["linear_cross_entropy", "linear_logprobs", "linear_ppo_loss"]

IMPLEMENTED = tuple(_LOGPROBS_IMPLEMENTED)

_MIB = 1 << 20
# Logits bytes per chunk. On the CPU ~32 MiB keeps a chunk near the caches' reach
# while the dW GEMM (K = chunk rows) stays compute-bound; on the GPU 64-256 MiB
# (1/16 of free memory) is enough rows to saturate the tensor cores.
_CPU_CHUNK_BYTES = 32 * _MIB
_GPU_CHUNK_BYTES = (64 * _MIB, 256 * _MIB)
# Below this many rows the dW accumulation (read + write of V·H fp32 per chunk)
# costs as much as the chunk's matmul (2·rows·V·H flops): keep chunks above it.
_MIN_ROWS = {"cpu": 32, "cuda": 128}


def auto_chunk_size(n: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk so one chunk of logits takes ~32 MiB (CPU) or 64-256 MiB (GPU, by free memory).

    ``hidden_size`` only matters through the chunk's own matmul, which is
    efficient once rows reach ``_MIN_ROWS``; a chunk never exceeds ``n`` rows.
    """
    if n <= 0:
        return 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = max(1, vocab * itemsize)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(max(free // 16, _GPU_CHUNK_BYTES[0]), _GPU_CHUNK_BYTES[1])
        min_rows = _MIN_ROWS["cuda"]
    else:
        budget = _CPU_CHUNK_BYTES
        min_rows = _MIN_ROWS["cpu"]
    rows = max(budget // row_bytes, min_rows)
    if rows >= 64:
        rows -= rows % 64  # GEMM-friendly
    return int(max(1, min(n, rows)))


def _chunk(n: int, h: int, v: int, dtype: torch.dtype, device: torch.device, chunk_size: int) -> int:
    return int(min(chunk_size, max(n, 1))) if chunk_size > 0 else auto_chunk_size(n, h, v, dtype, device)


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


def _kernel_bwd(g_logp, g_ent, logits, targets, lse, entropy, temperature: float, ignore_index: int, backend: str):
    """``dlogits[c, V]`` (logits' dtype) of ``Σ g_logp·logp + g_ent·entropy`` via the backend's kernel."""
    rows = logits.unsqueeze(0)
    args = [t.unsqueeze(0).contiguous() for t in (g_logp, g_ent, targets, lse, entropy)]
    if backend in ("cpu", "cuda"):
        grad = torch.ops.rlhf_kernels_C.logprobs_bwd(
            args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index
        )
    elif backend == "triton":
        from ..triton.logprobs import logprobs_bwd as triton_bwd

        grad = triton_bwd(args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index)
    else:
        grad = _torch_bwd(args[0], args[1], rows, args[2], args[3], args[4], temperature, ignore_index)
    return grad.reshape(logits.shape)


def _accumulate_weight_grad(grad_weight: torch.Tensor, dlogits: torch.Tensor, hidden_c: torch.Tensor) -> None:
    """``grad_weight += dlogits.T @ hidden_c`` with ``grad_weight`` float32 (float64) whatever the inputs' dtype."""
    if dlogits.dtype == grad_weight.dtype:
        grad_weight.addmm_(dlogits.t(), hidden_c)
        return
    if dlogits.is_cuda:
        # bf16 / fp16 tensor-core GEMM accumulating straight into the fp32 buffer (no fp32 copies).
        try:
            torch.ops.aten.addmm.dtype_out(grad_weight, dlogits.t(), hidden_c, grad_weight.dtype, out=grad_weight)
            return
        except (RuntimeError, NotImplementedError):
            pass
    # CPU (no mixed-dtype GEMM): one chunk-sized upcast of each operand.
    grad_weight.addmm_(dlogits.t().to(grad_weight.dtype), hidden_c.to(grad_weight.dtype))


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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden[N, H]``, ``weight[V, H]``, ``targets[N]`` int64, ``bias[V]`` -> ``(logp, entropy, lse)`` ``[N]``.

    ``chunk_size`` 0 picks the chunk automatically. Outputs are float32
    (float64 for float64 inputs). One chunk of logits exists at a time.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    _validate_targets(targets, v, ignore_index)
    dtype = _stats_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=dtype)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size)
    for s in range(0, n, c):
        e = min(n, s + c)
        logits = F.linear(hidden[s:e], weight, bias)
        out = _kernel_fwd(logits, targets[s:e], temperature, ignore_index, backend)
        del logits
        for dst, src in zip((logp, entropy, lse), out):
            dst[s:e].copy_(src)
    return logp, entropy, lse


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend):
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden[N, H], grad_weight[V, H], grad_bias[V])`` in the inputs' dtype, recomputing the logits per chunk.

    A gradient that is not needed comes back as an empty ``[0]`` tensor and is
    not computed. ``grad_weight`` / ``grad_bias`` are accumulated in float32
    (float64 for float64 inputs) across chunks, then cast.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    stats = lse.dtype
    g_logp = grad_logp.to(stats)
    g_ent = grad_entropy.to(stats)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = torch.zeros((v, h), dtype=acc, device=weight.device) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    if need_hidden or need_weight or need_bias:
        c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size)
        for s in range(0, n, c):
            e = min(n, s + c)
            hidden_c = hidden[s:e]
            logits = F.linear(hidden_c, weight, bias)
            dlogits = _kernel_bwd(
                g_logp[s:e], g_ent[s:e], logits, targets[s:e], lse[s:e], entropy[s:e], temperature, ignore_index,
                backend,
            )
            del logits
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[s:e])
            if need_weight:
                _accumulate_weight_grad(grad_weight, dlogits, hidden_c)
            if need_bias:
                grad_bias += dlogits.sum(0, dtype=acc)
            del dlogits
    if need_weight and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if need_bias and bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


@linear_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
      backend, need_hidden, need_weight, need_bias):
    grad_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    grad_bias = weight.new_empty(weight.shape[:1], dtype=bias_dtype) if need_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend = inputs
    _, entropy, lse = output
    ctx.has_bias = bias is not None
    saved = (hidden, weight, targets, lse, entropy) + ((bias,) if ctx.has_bias else ())
    ctx.save_for_backward(*saved)
    ctx.scalars = (temperature, ignore_index, chunk_size, backend)


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
    temperature, ignore_index, chunk_size, backend = ctx.scalars
    gh, gw, gb = linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
        backend, need_hidden, need_weight, need_bias,
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
    )


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    the parameter's dtype.

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
        chunk_size: rows per chunk; ``None`` picks ~32 MiB of logits per chunk
            on the CPU and 64-256 MiB (by free memory) on the GPU.
        backend: ``"triton" | "cpu" | "torch"`` for the per-chunk reduction;
            ``None`` picks as ``rk.logprobs`` does.

    Returns:
        ``logp`` float32 ``[*]``, or ``(logp, entropy)`` when ``return_entropy``.
        Memory beyond inputs and outputs: one chunk of logits (two in backward,
        plus the float32 weight-gradient accumulator for bf16/fp16 weights).
    """
    _check_linear_args(hidden, weight, targets, bias, chunk_size)
    temperature = check_positive("temperature", temperature)
    dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.promote_types(hidden.dtype, weight.dtype)
    if bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
    lead = hidden.shape[:-1]
    h = hidden.shape[-1]
    hidden2 = hidden.to(dtype).reshape(-1, h)
    weight2 = weight.to(dtype)
    bias2 = None if bias is None else bias.to(dtype)
    if weight2.stride(-1) != 1:
        weight2 = weight2.contiguous()
    chosen = resolve_for("linear_logprobs", hidden2, backend, IMPLEMENTED)
    logp, entropy, _ = linear_logprobs_fwd(
        hidden2,
        weight2,
        targets.reshape(-1).long(),
        bias2,
        temperature,
        int(ignore_index),
        0 if chunk_size is None else int(chunk_size),
        chosen,
    )
    logp, entropy = logp.reshape(lead), entropy.reshape(lead)
    return (logp, entropy) if return_entropy else logp


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

    logp, entropy = linear_logprobs(
        hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
        chunk_size=chunk_size, backend=backend,
    )
    term, kl, clipped = composed_ppo_terms(
        logp, entropy, old_logp, advantages, ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
        entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high,
        dual_clip=None if dual_clip is None else float(dual_clip),
    )
    return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SFT cross-entropy ``-logp`` from hidden states and the LM head, never materialising the logits.

    ``nll = -linear_logprobs(hidden, weight, targets, bias)`` (0 where
    ``targets == ignore_index``); ``reduction="mean"`` divides by the number
    of non-ignored targets (0, not NaN, when there are none), ``"sum"`` sums,
    ``"none"`` returns float32 ``nll[*]``.
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    logp = linear_logprobs(
        hidden, weight, targets, bias, ignore_index=ignore_index, chunk_size=chunk_size, backend=backend
    )
    nll = -logp
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    count = (targets != ignore_index).sum().to(nll.dtype)
    return reference._safe_divide(nll.sum(), count)
