"""Triton kernels for the fused per-token PPO term, straight from logits.

Forward, one program per row (one read of the logits): ``logp``, entropy and
``lse`` as in ``logprobs.py``, then per token::

    r    = exp(clamp(logp - old_logp, -20, 20))
    pg   = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
    pg   = min(pg, -A·dual_clip)                    where A < 0 (HAS_DUAL)
    term = pg + kl_coef·k(logp, ref_logp) - entropy_coef·entropy

Backward, a 2-D grid (rows x vocab blocks): each program recomputes the
per-token derivative from the saved ``logp`` (the same sub-gradient choices as
PyTorch autograd: ``max``/``min`` split ties evenly, ``clamp`` passes the
gradient on its closed interval)::

    ∂term/∂logp = -A·r·[pg_unclipped >= pg_clipped]·[|logp - old| <= 20]·dual + kl_coef·∂k/∂logp
    ∂term/∂H    = -entropy_coef

and writes ``dlogits`` from ``G_logp = g_logp + g_term·∂term/∂logp + g_kl·∂k/∂logp``
and ``G_H = g_H - g_term·entropy_coef`` with the log-prob backward formula.
The ``[B, T]`` aggregation (``loss_agg``) stays outside: its gradient arrives
as the per-token weight ``g_term``.

Forward that also writes the gradient (``ppo_fused_fwd``, ``ops.ppo_loss``'s default when
the logits require grad): ``loss = Σ w·term`` with weights ``w`` known from the mask, so one
program per row does the forward's sweep, then sweeps the row again writing ``dlogits`` with
``G_logp = w·∂term/∂logp``, ``G_H = -w·entropy_coef`` (the coefficients of ``csrc/cuda/ppo_term.cuh``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    KL_EST_CODES,
    body_walk,
    device_guard,
    kl_k,
    kl_k_dlogp,
    launch_row_kernel,
    row_autotune,
    row_logp_entropy_lse,
    vocab_config,
)
from .logprobs import _check_out, logprobs_grad_row_block


@triton.jit
def _ppo_pg(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL: tl.constexpr):
    """``(pg, clipped, d pg / d logp)`` of the clipped surrogate for one token."""
    raw = logp - old
    log_ratio = tl.where(raw < -20.0, -20.0, tl.where(raw > 20.0, 20.0, raw))
    in_lr = (raw >= -20.0) & (raw <= 20.0)
    ratio = tl.exp(log_ratio)
    lo = 1.0 - clip_low
    hi = 1.0 + clip_high
    ratio_c = tl.where(ratio < lo, lo, tl.where(ratio > hi, hi, ratio))
    pg_u = -adv * ratio
    pg_c = -adv * ratio_c
    clipped = pg_c > pg_u
    pg = tl.where(clipped, pg_c, pg_u)
    # ties (ratio inside the clip range) give the full unclipped derivative
    dpg = tl.where(clipped, 0.0, -adv)
    if HAS_DUAL:
        pg_d = -adv * dual_clip
        neg = adv < 0
        use_dual = neg & (pg_d < pg)
        dpg = tl.where(neg & (pg == pg_d), 0.5 * dpg, tl.where(use_dual, 0.0, dpg))
        pg = tl.where(use_dual, pg_d, pg)
        clipped = clipped | use_dual
    dpg = tl.where(in_lr, dpg * ratio, 0.0)
    return pg, clipped, dpg


@triton.jit
def _ppo_fwd_kernel(
    x_ptr,
    y_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    term_ptr,
    logp_ptr,
    ent_ptr,
    kl_ptr,
    clip_ptr,
    lse_ptr,
    T,
    V,
    stride_b,
    stride_t,
    inv_t,
    ignore_index,
    kl_coef,
    ent_coef,
    clip_low,
    clip_high,
    dual_clip,
    HAS_REF: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANES_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    _ppo_row_forward(x_ptr, y_ptr, old_ptr, adv_ptr, ref_ptr, term_ptr, logp_ptr, ent_ptr, kl_ptr, clip_ptr, lse_ptr,
                     row, b * stride_b + (row - b * T) * stride_t, V, inv_t, ignore_index, kl_coef, ent_coef,
                     clip_low, clip_high, dual_clip, HAS_REF, KL_EST, HAS_DUAL, BLOCK_V, LANES_V, ALIGNED_BODY, VEC)


@triton.jit
def _ppo_row_forward(x_ptr, y_ptr, old_ptr, adv_ptr, ref_ptr, term_ptr, logp_ptr, ent_ptr, kl_ptr, clip_ptr, lse_ptr,
                     row, x_off, V, inv_t, ignore_index, kl_coef, ent_coef, clip_low, clip_high, dual_clip,
                     HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr, BLOCK_V: tl.constexpr,
                     LANES_V: tl.constexpr, ALIGNED_BODY: tl.constexpr, VEC: tl.constexpr):
    """One row's forward (one read of its logits): stores ``term, logp, entropy, kl, clipped, lse`` at ``row`` and
    returns ``(y, logp, entropy, lse, dpg, dk)``: the derivatives in ``logp`` of the clipped surrogate and of the KL
    estimator (0 without ``ref_logp``), as ``_ppo_bwd_kernel`` recomputes them from the stored ``logp``."""
    y = tl.load(y_ptr + row)
    logp, ent, lse = row_logp_entropy_lse(x_ptr, x_off, y, V, inv_t, BLOCK_V, LANES_V, ALIGNED_BODY, VEC)
    valid = y != ignore_index
    logp = tl.where(valid, logp, 0.0)
    ent = tl.where(valid, ent, 0.0)
    old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    pg, clipped, dpg = _ppo_pg(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
    term = pg - ent_coef * ent
    if HAS_REF:
        ref = tl.load(ref_ptr + row).to(tl.float32)
        kl = kl_k(logp, ref, KL_EST)
        term = term + kl_coef * kl
        dk = kl_k_dlogp(logp, ref, KL_EST)
    else:
        kl = tl.zeros_like(ent)  # 0, even where logp is NaN (bad target)
        dk = tl.zeros_like(ent)
    tl.store(term_ptr + row, term)
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, ent)
    tl.store(kl_ptr + row, kl)
    tl.store(clip_ptr + row, clipped.to(tl.float32))
    tl.store(lse_ptr + row, lse)
    return y, logp, ent, lse, dpg, dk


_ppo_fwd_tuned = row_autotune(_ppo_fwd_kernel)


@triton.jit
def _ppo_fused_kernel(
    dx_ptr,
    x_ptr,
    y_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    w_ptr,
    term_ptr,
    logp_ptr,
    ent_ptr,
    kl_ptr,
    clip_ptr,
    lse_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_ob,
    stride_ot,
    inv_t,
    ignore_index,
    kl_coef,
    ent_coef,
    clip_low,
    clip_high,
    dual_clip,
    HAS_REF: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    BLOCK_V: tl.constexpr,
    LANES_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
    ALIGNED_GRAD: tl.constexpr = False,
):
    """The forward that also writes the gradient of ``loss = Σ w·term``: one program per row, the forward's sweep,
    then a second sweep over the same row, last block first (from L2 only where the rows in flight fit in it), writing
    ``dlogits = w·∂term/∂logits``, ``G_logp = w·dpg + (w·kl_coef)·dk`` and ``G_H = -w·entropy_coef`` through the
    log-prob backward formula (``csrc/cuda/ppo_term.cuh``'s coefficients).

    Two walks: the first sweep's (``ALIGNED_BODY``, ``_common.body_aligned`` of the logits alone) groups the row's
    sums, so it must not depend on where the gradient goes; the second's (``ALIGNED_GRAD``, of the logits and the
    gradient together) is elementwise, the same bits either way."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_off = b * stride_b + (row - b * T) * stride_t
    dx_off = b * stride_ob + (row - b * T) * stride_ot
    y, logp, ent, lse, dpg, dk = _ppo_row_forward(
        x_ptr, y_ptr, old_ptr, adv_ptr, ref_ptr, term_ptr, logp_ptr, ent_ptr, kl_ptr, clip_ptr, lse_ptr, row, x_off,
        V, inv_t, ignore_index, kl_coef, ent_coef, clip_low, clip_high, dual_clip, HAS_REF, KL_EST, HAS_DUAL, BLOCK_V,
        LANES_V, ALIGNED_BODY, VEC)
    w = tl.load(w_ptr + row).to(tl.float32)
    g_logp = w * dpg
    if HAS_REF:
        g_logp += (w * kl_coef) * dk
    g_logp = tl.where(w != 0, g_logp, 0.0)  # a masked token's row is 0, even where dpg or dk is not finite
    g_ent = 0.0 - w * ent_coef
    valid = y != ignore_index
    # the backward's blocks (``_common.column_blocks``): ALIGNED_GRAD's start up to a vector before the row
    if ALIGNED_GRAD:
        blocks = tl.cdiv(V + (VEC - 1), BLOCK_V)
    else:
        blocks = tl.cdiv(V, BLOCK_V)
    # Backwards, from the row's last block: the first blocks sweep 2 reads again are the ones sweep 1 read last, the
    # likeliest to be still in L2 (csrc/cuda's reverse_sweep2). (blocks - 1 - i is a tensor, as the backward kernel's
    # program id is: Triton 3.2's interpreter could not combine the Python int its loops give with a tensor condition,
    # block_columns' `(j >= 1) & ...`.)
    for i in range(0, blocks):
        logprobs_grad_row_block(dx_ptr, x_ptr, blocks - 1 - i, dx_off, x_off, V, y, lse, ent, g_logp, g_ent, inv_t,
                                valid, BLOCK_V, ALIGNED_GRAD, VEC)


# The fused kernel's sweep 2 takes a whole BLOCK_V per iteration, as a flat block: the forward's candidates that give
# a thread at most 32 columns of it (the sm_90 builds of 2048 x 256 x 1, 4096 x 256 x 1 and 4096 x 512 x 2, 64-128
# columns per thread, spilled 144-856 bytes to the stack; tests/triton/aot_compile_kernels.py). The autotuner times
# both sweeps together.
_PPO_FUSED_CANDIDATES = tuple(c for c in _common._ROW_FWD_CANDIDATES if c[0] <= 32 * 32 * c[2])
_ppo_fused_tuned = row_autotune(_ppo_fused_kernel, _PPO_FUSED_CANDIDATES)


@triton.jit
def _ppo_bwd_kernel(
    dx_ptr,
    x_ptr,
    y_ptr,
    g_term_ptr,
    g_logp_ptr,
    g_ent_ptr,
    g_kl_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_ob,
    stride_ot,
    inv_t,
    ignore_index,
    kl_coef,
    ent_coef,
    clip_low,
    clip_high,
    dual_clip,
    HAS_REF: tl.constexpr,
    KL_EST: tl.constexpr,
    HAS_DUAL: tl.constexpr,
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
    logp = tl.load(logp_ptr + row).to(tl.float32)
    ent = tl.load(ent_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row).to(tl.float32)
    old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    g_term = tl.load(g_term_ptr + row).to(tl.float32)
    _, _, dpg = _ppo_pg(logp, old, adv, clip_low, clip_high, dual_clip, HAS_DUAL)
    # g_logp + g_term·dterm + g_kl·dk, each product 0 where its upstream gradient is (ops.ppo.weighted, the torch
    # twin): a masked token's row is 0, even where dpg or dk is not finite
    dterm = dpg
    if HAS_REF:
        dk = kl_k_dlogp(logp, tl.load(ref_ptr + row).to(tl.float32), KL_EST)
        dterm += kl_coef * dk
    g_logp = tl.load(g_logp_ptr + row).to(tl.float32) + tl.where(g_term != 0, g_term * dterm, 0.0)
    if HAS_REF:
        g_kl = tl.load(g_kl_ptr + row).to(tl.float32)
        g_logp += tl.where(g_kl != 0, g_kl * dk, 0.0)
    g_ent = tl.load(g_ent_ptr + row).to(tl.float32) - g_term * ent_coef
    logprobs_grad_row_block(dx_ptr, x_ptr, j, dx_off, x_off, V, y, lse, ent, g_logp, g_ent, inv_t, y != ignore_index,
                            BLOCK_V, ALIGNED_BODY, VEC)


def _check_rows(rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(2) != 1:
        raise ValueError(f"rows must be [B, T, V] with unit vocab stride, got shape {tuple(rows.shape)} strides {rows.stride()}")


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n).contiguous()


def _token_inputs(n: int, targets, old_logp, advantages, ref_logp) -> tuple[torch.Tensor, ...]:
    """``(y, old, adv, ref)`` flat and contiguous for the forward kernels; without ``ref_logp`` its pointer is
    ``old``'s (never read: ``HAS_REF`` is off)."""
    y, old, adv = _flat(targets.to(torch.int64), n), _flat(old_logp, n), _flat(advantages, n)
    return y, old, adv, (_flat(ref_logp, n) if ref_logp is not None else old)


def ppo_term_fwd(
    rows: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
) -> tuple[torch.Tensor, ...]:
    """``rows[B, T, V]``, per-token ``[B, T]`` inputs -> ``(term, logp, entropy, kl, clipped, lse)``, each ``[B, T]`` float32.

    ``clipped`` is 1.0 where the clipped (or dual-clipped) branch was active.
    """
    _check_rows(rows)
    B, T, V = rows.shape
    n = B * T
    outs = [_common.alloc((B, T), torch.float32, rows.device) for _ in range(6)]
    if n == 0:
        return tuple(outs)
    y, old, adv, ref = _token_inputs(n, targets, old_logp, advantages, ref_logp)
    with device_guard(rows):
        launch_row_kernel(
            _ppo_fwd_kernel, _ppo_fwd_tuned, (n,), rows, y, old, adv, ref, *outs, T, V, rows.stride(0),
            rows.stride(1), 1.0 / float(temperature), int(ignore_index), float(kl_coef), float(entropy_coef),
            float(clip_low), float(clip_high), float(dual_clip or 0.0), vocab=V, device=rows.device,
            HAS_REF=ref_logp is not None, KL_EST=KL_EST_CODES[kl_estimator], HAS_DUAL=dual_clip is not None,
            **body_walk(rows),
        )
    return tuple(outs)


def ppo_term_bwd(
    grad_term: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_kl: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    entropy: torch.Tensor,
    lse: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. ``rows[B, T, V]`` of ``Σ g_term·term + g_logp·logp + g_H·H + g_kl·kl`` in ``rows.dtype``.

    A new contiguous tensor, or written into ``out`` (``[B, T, V]``, unit vocab
    stride, any row strides: e.g. ``full[:, :-1]`` of the ``[B, T+1, V]`` logits' gradient).
    """
    _check_rows(rows)
    B, T, V = rows.shape
    n = B * T
    grad = _common.alloc((B, T, V), rows.dtype, rows.device) if out is None else _check_out(out, rows)
    if grad.numel() == 0:
        return grad
    flat = [_flat(t, n) for t in (targets.to(torch.int64), grad_term, grad_logp, grad_entropy, grad_kl, logp, entropy, lse, old_logp, advantages)]
    ref = _flat(ref_logp, n) if ref_logp is not None else flat[-2]
    block, warps = vocab_config(V, rows.device, "bwd")
    with device_guard(rows):
        walk = body_walk(rows, grad)
        _ppo_bwd_kernel[(n, _common.column_blocks(V, block, walk))](
            grad, rows, *flat, ref, T, V, rows.stride(0), rows.stride(1), grad.stride(0), grad.stride(1),
            1.0 / float(temperature),
            int(ignore_index), float(kl_coef), float(entropy_coef), float(clip_low), float(clip_high),
            float(dual_clip or 0.0), HAS_REF=ref_logp is not None, KL_EST=KL_EST_CODES[kl_estimator],
            HAS_DUAL=dual_clip is not None, BLOCK_V=block, num_warps=warps, **walk,
        )
    return grad


def ppo_fused_fwd(
    rows: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    weights: torch.Tensor,
    temperature: float,
    ignore_index: int,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, ...]:
    """``ppo_term_fwd``'s ``(term, logp, entropy, kl, clipped, lse)`` and ``dlogits = ∂(Σ w·term)/∂rows`` in one
    launch: ``weights[B, T]`` float32 are the per-token ``w`` (``ops.ppo.aggregation_weights``).

    ``dlogits`` is a new contiguous ``[B, T, V]`` tensor in ``rows.dtype``, or written into ``out`` (unit vocab
    stride, any row strides, not overlapping ``rows``: the autotuner runs the kernel more than once on a key's
    first call, so the gradient cannot be written over the logits it reads).
    Returns ``(term, logp, entropy, kl, clipped, lse, dlogits)``.
    """
    _check_rows(rows)
    B, T, V = rows.shape
    n = B * T
    stats = [_common.alloc((B, T), torch.float32, rows.device) for _ in range(6)]
    grad = _common.alloc((B, T, V), rows.dtype, rows.device) if out is None else _check_out(out, rows)
    if n == 0:
        return tuple(stats) + (grad,)
    y, old, adv, ref = _token_inputs(n, targets, old_logp, advantages, ref_logp)
    w = _flat(weights.to(torch.float32), n)
    with device_guard(rows):
        launch_row_kernel(
            _ppo_fused_kernel, _ppo_fused_tuned, (n,), grad, rows, y, old, adv, ref, w, *stats, T, V, rows.stride(0),
            rows.stride(1), grad.stride(0), grad.stride(1), 1.0 / float(temperature), int(ignore_index),
            float(kl_coef), float(entropy_coef), float(clip_low), float(clip_high), float(dual_clip or 0.0),
            vocab=V, device=rows.device, HAS_REF=ref_logp is not None, KL_EST=KL_EST_CODES[kl_estimator],
            HAS_DUAL=dual_clip is not None, **body_walk(rows),
            ALIGNED_GRAD=_common.body_aligned(rows, grad),  # (the sums' walk above follows the logits alone)
        )
    return tuple(stats) + (grad,)
