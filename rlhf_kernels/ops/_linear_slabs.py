"""Vocabulary slabs (``chunk_by="vocab"``): the fused-linear loop over slabs of vocabulary columns, each over all rows.

Pass 1 (``_slab_forward``) gives every row's ``(logp, entropy, lse)`` from one
slab of logits at a time; pass 2 (``_slab_gradients``) computes the slabs'
logits again and turns them into the gradients, each slab's weight gradient one
GEMM over every token (so no ``[V, H]`` float32 accumulator).
"""

from __future__ import annotations

import torch

from ._linear_common import (
    _GPU_SLAB_BYTES,
    _acc_dtype,
    _accumulator,
    _chunk_buffers,
    _chunk_logits,
    _grad_buffer,
    _kernel_bwd,
    _kernel_fwd,
    _row_buffer,
    _stats_dtype,
    float32_gemm_reduction,
    slab_columns,
)
from ._linear_gemm import grad_hidden_gemm, grad_weight_gemm

def _slabs(weight: torch.Tensor, hidden: torch.Tensor, chunk_size: int, backend: str,
           gpu_bytes: int = _GPU_SLAB_BYTES):
    """``[(s, e), ...]``: the vocabulary slabs of ``chunk_by="vocab"`` (``slab_columns`` wide) over ``hidden[N, H]``'s
    rows."""
    v = weight.shape[0]
    cols = slab_columns(hidden.shape[0], v, hidden.dtype, hidden.device, chunk_size, _chunk_buffers(backend),
                        gpu_bytes)
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
    n = hidden.shape[0]
    stats = _stats_dtype(hidden.dtype)
    slabs = _slabs(weight, hidden, chunk_size, backend)
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
                    chunk_size, backend, need_hidden, need_weight, need_bias, gpu_bytes=_GPU_SLAB_BYTES):
    """Pass 2 of the vocabulary slabs: ``(grad_hidden, grad_weight, grad_bias)`` of ``Σ g_logp·logp + g_ent·H``
    from each slab's logits computed again, given the whole rows' ``lse`` and ``entropy`` ``[N]``::

        dlogits_s = logprobs backward kernel(logits_s)      (slab-local targets; one past the slab: no one-hot)
        grad_hidden += dlogits_s @ weight_s,  grad_weight_s = dlogits_s.T @ hidden,  grad_bias_s = Σ dlogits_s

    ``grad_hidden`` is accumulated in float32 (float64). Each ``grad_weight_s`` is
    one GEMM over all ``N`` tokens written straight into its rows of
    ``grad_weight``: the GEMM sums in float32 and rounds each element once
    (``float32_gemm_reduction``), the same numbers as a float32 buffer cast
    afterwards, without the ``[cols, H]`` float32 buffer or the copy (no
    ``[V, H]`` float32 accumulator either). ``grad_bias`` stays float32
    (float64); a gradient not needed is an empty ``[0]`` tensor. ``gpu_bytes``: the slabs' logits budget on the
    GPU (``slab_columns``).
    """
    n = hidden.shape[0]
    v = weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    valid = targets != ignore_index
    unused = torch.full_like(targets, -1)
    dx = _accumulator(n, hidden, _acc_dtype(hidden.dtype)) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    for i, (s, e) in enumerate(_slabs(weight, hidden, chunk_size, backend, gpu_bytes)):
        logits, in_slab = _slab_logits(hidden, weight, bias, targets, valid, s, e)
        y_local = torch.where(in_slab, targets - s, torch.where(valid, torch.full_like(targets, e - s), unused))
        dlogits = _kernel_bwd(g_logp, g_ent, logits, y_local, lse, entropy, temperature, -1, backend,
                              _grad_buffer(logits, backend, None))
        del logits
        if dx is not None:
            grad_hidden_gemm(dx, dlogits, weight[s:e], i == 0)
        if need_weight:  # one GEMM over all N tokens: float32 sums, each rounded once into the weight's dtype
            with float32_gemm_reduction(dlogits):
                grad_weight_gemm(grad_weight[s:e], dlogits, hidden, True)
        if need_bias:
            grad_bias[s:e] = dlogits.sum(0, dtype=acc)
        del dlogits
    grad_hidden = hidden.new_empty(0)
    if dx is not None:
        grad_hidden = dx if dx.dtype == hidden.dtype else dx.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
