"""The fused-linear losses' forward that also produces the gradient (``rlhf_kernels::linear_loss_fused``).

``linear_cross_entropy`` and ``linear_ppo_loss`` are ``loss = Σ_i w_i·term_i``
with each ``term_i`` a function of the token's ``(logp_i, entropy_i)`` only, so
each chunk's ``dlogits`` are known as soon as its log-probs are: 3 matmuls per
step over row chunks (``_row_chunk_loss``); 4 with ``chunk_by="vocab"``
(``_vocab_slab_loss``: row chunks for ``grad_hidden``, then vocabulary slabs for
``grad_weight``, neither with a float32 accumulator). ``ops/linear.py``'s module
docstring has the math.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .. import reference
from . import _forward_grads as forward_grads
from ._linear_common import (
    IMPLEMENTED,
    _acc_dtype,
    _accumulator,
    _apply_chunk_grad,
    _chunk,
    _chunk_buffers,
    _grad_buffer,
    _in_param_dtypes,
    _kernel_bwd,
    _kernel_fwd,
    _promoted,
    _row_buffer,
    _chunk_logits,
    _stats_dtype,
    _GPU_LOSS_SLAB_BYTES,
)
from ._linear_slabs import _slab_gradients
from .logprobs import _validate_targets, resolve_for
from .ppo import _torch_dterm_dlogp, aggregation_weights, weighted

# RLHF_KERNELS_LINEAR_GRAD: where linear_cross_entropy / linear_ppo_loss compute their gradient.
LINEAR_GRAD_PATHS = ("auto", "forward", "recompute")
_LOSS_KINDS = ("nll", "ppo")


def linear_grad_path() -> str:
    """The ``RLHF_KERNELS_LINEAR_GRAD`` setting (``auto`` when unset)."""
    value = os.environ.get("RLHF_KERNELS_LINEAR_GRAD", "auto").strip().lower() or "auto"
    if value not in LINEAR_GRAD_PATHS:
        raise ValueError(f"RLHF_KERNELS_LINEAR_GRAD must be one of {LINEAR_GRAD_PATHS}, got {value!r}")
    return value


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
    return weighted(w_c, dterm), w_c * -entropy_coef


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
        return reference.masked(term, w).sum()
    return reference.aggregate_loss(term.reshape(mask.shape), mask, loss_agg)


def _vocab_slab_loss(hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index,
                     loss, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend,
                     need_hidden, need_weight, need_bias):
    """``linear_loss_fused`` with ``chunk_by="vocab"``: ``(logp, entropy, grad_hidden, grad_weight, grad_bias)``
    (``grad_bias`` still in float32: ``linear_loss_fused`` casts it), with no float32 accumulator of either
    gradient. Two sweeps of 2 GEMMs each, 4 matmuls in all::

        rows  (_row_chunk_loss, all V columns of a few rows):  logits_c, its (logp, entropy, lse) and the loss's
              upstream (g_logp, g_ent), dlogits_c, grad_hidden_c = dlogits_c @ weight  (one GEMM over V: exact)
        slabs (_slab_gradients, a few columns of all N rows):  logits_s again, dlogits_s from the kept
              (lse, g_logp, g_ent), grad_weight_s = dlogits_s.T @ hidden  (one GEMM over N), grad_bias_s

    Each gradient element is then one GEMM's float32 sum rounded once into the input's dtype: no ``[V, H]``
    float32 weight-gradient accumulator (the row chunks' 2 GB at 128256 x 4096) and, unlike ``linear_logprobs``'
    slabs, whose upstream gradient is known only in backward, no ``[N, H]`` float32 one for ``grad_hidden``
    either. The row sweep runs before ``grad_weight`` exists, so its chunks may be as large as it
    (``weight_grad_cast``) without raising the peak: ``grad_weight + grad_hidden + one slab`` of
    ``_GPU_LOSS_SLAB_BYTES``. ``chunk_size``: rows per chunk of the first sweep and columns per slab of the
    second."""
    n = hidden.shape[0]
    acc = _acc_dtype(weight.dtype)
    stats = _stats_dtype(hidden.dtype)
    kept = tuple(hidden.new_empty((n,), dtype=stats) for _ in range(3))  # lse, g_logp, g_ent per row
    logp, entropy, grad_hidden, _, _ = _row_chunk_loss(
        hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index, loss, kl_coef,
        kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend, need_hidden, False, False,
        kept=kept, weight_grad_cast=need_weight and acc != weight.dtype,
    )
    if not (need_weight or need_bias):
        return logp, entropy, grad_hidden, weight.new_empty(0), weight.new_empty(0)
    row_lse, g_logp, g_ent = kept
    _, grad_weight, grad_bias = _slab_gradients(g_logp, g_ent, hidden, weight, targets, bias, row_lse, entropy,
                                                temperature, ignore_index, chunk_size, backend, False, need_weight,
                                                need_bias, _GPU_LOSS_SLAB_BYTES)
    return logp, entropy, grad_hidden, grad_weight, grad_bias


def _row_chunk_loss(hidden, weight, targets, bias, w, old_logp, advantages, ref_logp, temperature, ignore_index,
                    loss, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, chunk_size, backend,
                    need_hidden, need_weight, need_bias, kept=None, weight_grad_cast=None):
    """``linear_loss_fused`` over row chunks: ``(logp, entropy, grad_hidden, grad_weight, grad_bias)``, the weight
    and bias gradients still in float32 (``linear_loss_fused`` casts them). No gradient wanted: the forward only.

    ``kept``: three ``[N]`` tensors that receive each row's ``lse``, ``g_logp`` and ``g_ent`` (the vocabulary
    slabs' second sweep, ``_vocab_slab_loss``, needs them). ``weight_grad_cast``: whether the chunk size may use
    the allowance of a 16-bit weight gradient cast from float32 (``auto_chunk_size``); by default, whether this
    loop computes one."""
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
    if weight_grad_cast is None:
        weight_grad_cast = need_weight and acc != weight.dtype
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, weight_grad_cast, _chunk_buffers(backend))
    buffer = _row_buffer(c, v, hidden)
    spare = _row_buffer(c, v, hidden) if any_grad and _chunk_buffers(backend) == 2 else None
    for s in range(0, n, c):
        e = min(n, s + c)
        hidden_c, targets_c, w_c = hidden[s:e], targets[s:e], w[s:e]
        logits = _chunk_logits(hidden_c, weight, bias, buffer)
        lp, ent, lse = _kernel_fwd(logits, targets_c, temperature, ignore_index, backend)
        logp[s:e].copy_(lp)
        entropy[s:e].copy_(ent)
        if not (any_grad or kept is not None):
            continue
        g_logp, g_ent = _token_grads(lp, w_c, loss, old_logp, advantages, ref_logp, s, e, kl_coef, kl_estimator,
                                     entropy_coef, clip_low, clip_high, dual_clip)
        if kept is not None:
            for into, value in zip(kept, (lse, g_logp, g_ent)):
                into[s:e].copy_(value)
        if not any_grad:
            continue
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    ``chunk_by="vocab"``: the weight and bias gradients over vocabulary slabs, after a row sweep for the rest
    (``_vocab_slab_loss``).
    """
    # before the chunks: the sync waits only for the work queued ahead (see logprobs._validate_targets)
    _validate_targets(targets, weight.shape[0], ignore_index, "linear_cross_entropy or linear_ppo_loss")
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
    grad_weight, grad_bias = _in_param_dtypes(grad_weight, grad_bias, weight, bias, need_weight, need_bias)
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
