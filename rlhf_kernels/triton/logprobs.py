"""Triton kernels for ``logprobs`` (log-prob of the target token + entropy).

Forward, one program per row of ``z = x / T`` (one read of the logits)::

    mx, S, T_ = running (max x, Σexp(z - max z), Σexp(z - max z)·(z - max z))   (_common.row_softmax_stats)
    lse = mx/T + log S;  entropy = log S - T_ / S;  logp = (x[y] - mx)/T - log S

Backward, a 2-D grid (rows x vocab blocks) that rebuilds ``p`` from the saved
``lse`` and entropy ``H``, with ``lp = z - lse``::

    dz = p·(-(g_logp + g_ent·H) - g_ent·lp) + g_logp·onehot(y);   dlogits = dz / T

written in the logits' dtype. Rows are addressed as ``[B, T, V]`` with strides
(``logits[:, :-1]`` needs no copy). Ignored targets give 0 outputs and 0
gradient; an out-of-range target (validation off) is never dereferenced and
gives a NaN ``logp``. Accumulation is fp32 (float64 logits are computed in
fp32; the op layer sends them elsewhere unless ``backend="triton"`` is forced).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    body_walk,
    block_columns,
    device_guard,
    launch_row_kernel,
    load_cols,
    row_autotune,
    row_logp_entropy_lse,
    store_cols,
    vocab_config,
)


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr,
    y_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    T,
    V,
    stride_b,
    stride_t,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    LANES_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_off = b * stride_b + (row - b * T) * stride_t
    y = tl.load(y_ptr + row)
    logp, ent, lse = row_logp_entropy_lse(x_ptr, x_off, y, V, inv_t, BLOCK_V, LANES_V, ALIGNED_BODY, VEC)
    valid = y != ignore_index
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
    tl.store(lse_ptr + row, lse)


_logprobs_fwd_tuned = row_autotune(_logprobs_fwd_kernel)


@triton.jit
def _logprobs_bwd_kernel(
    dx_ptr,
    x_ptr,
    y_ptr,
    g_logp_ptr,
    g_ent_ptr,
    lse_ptr,
    ent_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_ob,
    stride_ot,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = row // T
    x_off = b * stride_b + (row - b * T) * stride_t
    dx_off = b * stride_ob + (row - b * T) * stride_ot
    y = tl.load(y_ptr + row)
    g_logp = tl.load(g_logp_ptr + row).to(tl.float32)
    g_ent = tl.load(g_ent_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    ent = tl.load(ent_ptr + row).to(tl.float32)
    logprobs_grad_row_block(dx_ptr, x_ptr, j, dx_off, x_off, V, y, lse, ent, g_logp, g_ent, inv_t, y != ignore_index,
                            BLOCK_V, ALIGNED_BODY, VEC)


@triton.jit
def logprobs_grad_row_block(dx_ptr, x_ptr, j, dx_off, x_off, V, y, lse, ent, g_logp, g_ent, inv_t, valid,
                            BLOCK_V: tl.constexpr, ALIGNED_BODY: tl.constexpr, VEC: tl.constexpr):
    """Block ``j`` of the row at ``x_off`` (its gradient at ``dx_off``): a whole one unmasked with 16-byte accesses
    (``ALIGNED_BODY``: ``_common.block_columns``), else under a mask (``logprobs_grad_block``)."""
    whole, c0, cols, mask = block_columns(j, x_off, V, BLOCK_V, VEC, ALIGNED_BODY)
    if whole:
        ar = tl.arange(0, BLOCK_V)
        logprobs_grad_block(dx_ptr, x_ptr, tl.multiple_of(dx_off + c0, VEC) + ar, tl.multiple_of(x_off + c0, VEC) + ar,
                            cols, 0, y, lse, ent, g_logp, g_ent, inv_t, valid, True)
    else:
        logprobs_grad_block(dx_ptr, x_ptr, dx_off + cols, x_off + cols, cols, mask, y, lse, ent, g_logp, g_ent, inv_t,
                            valid, False)


@triton.jit
def logprobs_grad_block(dx_ptr, x_ptr, dx_offs, x_offs, cols, mask, y, lse, ent, g_logp, g_ent, inv_t, valid,
                        WHOLE: tl.constexpr):
    """One block of a row's ``dlogits`` (``WHOLE``: every column in the row, no mask: 16-byte accesses where
    aligned): ``logprobs_dz`` of ``z = x·inv_t``, over ``T``; 0 for an ignored target (``valid`` false)."""
    z = load_cols(x_ptr, x_offs, mask, WHOLE) * inv_t
    dz = tl.where(valid, logprobs_dz(z, cols, y, lse, ent, g_logp, g_ent), 0.0) * inv_t
    store_cols(dx_ptr, dx_offs, dz, mask, WHOLE)


@triton.jit
def logprobs_dz(z, cols, y, lse, ent, g_logp, g_ent):
    """``∂(g_logp·logp + g_ent·H)/∂z`` for a block of columns (before ``/ T``)."""
    lp = z - lse
    p = tl.exp2(lp * 1.4426950408889634)
    lp = tl.where(lp == float("-inf"), 0.0, lp)  # p = 0 there: keeps 0·(-inf) out
    dz = p * (-(g_logp + g_ent * ent) - g_ent * lp)
    return tl.where(cols == y, dz + g_logp, dz)


def _check_rows(rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(2) != 1:
        raise ValueError(f"rows must be [B, T, V] with unit vocab stride, got shape {tuple(rows.shape)} strides {rows.stride()}")


def _check_out(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` must be shaped like ``rows``, of its dtype and device, with unit vocab stride."""
    if out.shape != rows.shape or out.dtype != rows.dtype or out.device != rows.device or out.stride(2) != 1:
        raise ValueError(
            f"out must be [B, T, V] = {tuple(rows.shape)} of {rows.dtype} on {rows.device} with unit vocab stride, "
            f"got {tuple(out.shape)} {out.dtype} strides {out.stride()} on {out.device}"
        )
    return out


def _stats_dtype(rows: torch.Tensor) -> torch.dtype:
    return torch.float64 if rows.dtype == torch.float64 else torch.float32


def logprobs_fwd(
    rows: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows[B, T, V]`` (vocab stride 1), ``targets[B, T]`` int -> ``(logp, entropy, lse)``, each ``[B, T]`` float32."""
    _check_rows(rows)
    B, T, V = rows.shape
    targets = targets.reshape(B, T).to(torch.int64).contiguous()
    dtype = _stats_dtype(rows)
    logp = _common.alloc((B, T), dtype, rows.device)
    entropy = _common.alloc(logp.shape, logp.dtype, logp.device)
    lse = _common.alloc(logp.shape, logp.dtype, logp.device)
    if B * T == 0:
        return logp, entropy, lse
    with device_guard(rows):
        launch_row_kernel(
            _logprobs_fwd_kernel, _logprobs_fwd_tuned, (B * T,), rows, targets, logp, entropy, lse, T, V,
            rows.stride(0), rows.stride(1), 1.0 / float(temperature), int(ignore_index), vocab=V, device=rows.device,
            **body_walk(rows),
        )
    return logp, entropy, lse


def logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``rows[B, T, V]`` in ``rows.dtype``: a new contiguous tensor, or written into ``out``.

    ``out``: a ``[B, T, V]`` tensor of ``rows.dtype`` with unit vocab stride and any
    row strides (e.g. ``full[:, :-1]`` of the gradient of the ``[B, T+1, V]`` logits).
    """
    _check_rows(rows)
    B, T, V = rows.shape
    flat = [t.reshape(B * T).contiguous() for t in (targets.to(torch.int64), grad_logp, grad_entropy, lse, entropy)]
    grad = _common.alloc((B, T, V), rows.dtype, rows.device) if out is None else _check_out(out, rows)
    if grad.numel() == 0:
        return grad
    block, warps = vocab_config(V, rows.device, "bwd")
    with device_guard(rows):
        walk = body_walk(rows, grad)
        _logprobs_bwd_kernel[(B * T, _common.column_blocks(V, block, walk))](
            grad, rows, *flat, T, V, rows.stride(0), rows.stride(1), grad.stride(0), grad.stride(1),
            1.0 / float(temperature), int(ignore_index), BLOCK_V=block, num_warps=warps, **walk,
        )
    return grad
