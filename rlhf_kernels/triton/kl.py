"""Triton kernels for the KL ops: exact full-vocabulary KL and the k1/k2/k3 estimators.

``kl_divergence`` forward, one program per row, one read of both rows, with a
block-max state (as ``_common.row_softmax_stats``): one running max per row and
program, ``Mz = max x`` and ``Mr = max x_ref``, raised once per vocabulary block,
while the lanes keep only sums. With ``a = x - Mz``, ``c = x_ref - Mr`` and
``s2 = log2(e) / T``::

    sz = Σ 2^(a·s2),   sr = Σ 2^(c·s2),   u = Σ 2^(a·s2)·(a - c)
    KL = u / (T·sz) + log sr - log sz = Σ p·(log p - log q)
    lse_z = Mz / T + log sz,   lse_r = Mr / T + log sr

``u`` is relative to both maxima, so rows equal up to a constant give an
exactly-zero KL (no ``lse_z - lse_r`` cancellation).

Backward (2-D grid, rows x vocab blocks), rebuilding ``log p = z - lse_z`` and
``log q = r - lse_r`` (``z = x / T``, ``r = x_ref / T``) from the saved per-row values::

    dz = g·p·(log p - log q - KL) / T;    dr = g·(q - p) / T   (when wanted)

``kl_estimate`` is elementwise: ``d = ref - logp``; k1 ``= -d``, k2 ``= d²/2``,
k3 ``= exp(d) - 1 - d`` (series near 0), optional clamp to ``[-c, c]``.
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
    aligned_blocks,
    block_columns,
    device_guard,
    kl_k,
    kl_k_dlogp,
    launch_row_kernel,
    load_cols,
    next_pow2,
    row_autotune,
    row_tile,
    store_cols,
    tile_max,
    vocab_config,
)
from .logprobs import _check_out


@triton.jit
def _kl_divergence_fwd_kernel(
    x_ptr,
    r_ptr,
    kl_ptr,
    lse_z_ptr,
    lse_r_ptr,
    T,
    V,
    stride_xb,
    stride_xt,
    stride_rb,
    stride_rt,
    inv_t,
    BLOCK_V: tl.constexpr,
    LANES_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
):
    """Row ``(b, t)`` of ``x, x_ref[B, T, V]`` -> ``kl, lse_z, lse_r[b, t]`` for ``softmax(x·inv_t)`` and ``x_ref``.

    One program per row, one read of both rows, with a block-max state (as
    :func:`._common.row_softmax_stats`): scalar running maxima ``Mz = max x`` and
    ``Mr = max x_ref`` (raw logits) shared by the program, and per lane (``LANES_V``
    of them, each folding ``BLOCK_V // LANES_V`` values of an iteration's
    :func:`._common.row_tile`), with ``a = x - Mz``, ``c = x_ref - Mr`` and
    ``s2 = log2(e)·inv_t``::

        sz = Σ 2^(a·s2),   sr = Σ 2^(c·s2),   u = Σ 2^(a·s2)·(a - c)

    When a block raises the maxima, by ``δz = Mz_old - Mz_new <= 0`` and ``δr``
    likewise (raw units: each earlier ``a`` grows by ``δz``, each ``c`` by
    ``δr``), the state is first rescaled::

        u <- 2^(δz·s2)·(u + sz·(δz - δr)),   sz <- 2^(δz·s2)·sz,   sr <- 2^(δr·s2)·sr

    The lanes share the maxima, so the row sums are plain sums; with
    ``log p = a·inv_t - ln Sz`` and ``log q = c·inv_t - ln Sr``::

        KL = Σ p·(log p - log q) = inv_t·U / Sz + ln Sr - ln Sz
        lse_z = Mz·inv_t + ln Sz,   lse_r = Mr·inv_t + ln Sr

    ``Mz·inv_t`` rounds as the backward's ``z = x·inv_t`` does at the max. ``u``
    is kept in logits units and ``ln Sr - ln Sz`` taken as one difference so no
    product can be fused into a subtraction (FMA contraction): rows equal up to
    an exactly representable constant give ``a - c = 0``, ``Sz = Sr`` and KL = 0
    exactly. ``a = x - Mz`` is exact near the max, so |x| ~ 1e5 loses nothing.

    ``u`` adds ``2^(a·s2)·where(2^(a·s2) > 0, a - c, 0)``, the reference's
    ``p·where(p > 0, ·, 0)``: a -inf or underflowed ``p`` adds 0 even where
    ``q = 0``, a live ``p`` where ``x_ref = -inf`` adds +inf (KL = +inf), and a
    rescale that underflows to 0 drops the old terms. NaN anywhere in a row
    reaches ``sz`` or ``sr`` (``2^NaN``), so that row's outputs only. A fully
    -inf row has ``Sz = 0``: NaN KL and -inf lse, as the reference.

    Per value pair (sm_90 SASS, ``LANES_V = BLOCK_V``): two block-max steps, three
    subtracts, two multiplies, two exp2, a compare and a select, three FMAs (``sz``
    and ``sr`` with their rescale folded in, ``u``) and ``u``'s rescale (an FMA, a
    multiply, a select: with a state as wide as the block that is per value too):
    17, and about 19 floating-point instructions per pair in the loop with the
    block reductions' share, against 42 for the per-lane-max state this replaced.
    A narrower state pays the rescale once per lane and iteration instead.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_off = b * stride_xb + t * stride_xt
    r_off = b * stride_rb + t * stride_rt  # with ALIGNED_BODY, equal to x_off modulo VEC (_common.body_aligned)
    scale2 = inv_t * 1.4426950408889634
    mz = tl.max(tl.full([LANES_V], float("-inf"), tl.float32), 0)
    mr = tl.max(tl.full([LANES_V], float("-inf"), tl.float32), 0)
    sz = tl.zeros([LANES_V], tl.float32)
    sr = tl.zeros([LANES_V], tl.float32)
    u = tl.zeros([LANES_V], tl.float32)
    tile = row_tile(LANES_V, BLOCK_V)
    if ALIGNED_BODY:  # blocks from the rows' 16-byte boundary, the whole ones unmasked (_common.aligned_blocks)
        shift, x_base, end, whole_end = aligned_blocks(x_off, V, BLOCK_V, VEC)
        r_base = r_off - shift
        head = (tile >= shift) & (tile < end)
        x = tl.load(x_ptr + x_base + tile, mask=head, other=float("-inf")).to(tl.float32)
        r = tl.load(r_ptr + r_base + tile, mask=head, other=float("-inf")).to(tl.float32)
        mz, mr, sz, sr, u = _fold_two_rows(x, r, mz, mr, sz, sr, u, scale2)
        for i in range(1, whole_end):
            x = tl.load(x_ptr + tl.multiple_of(x_base + i * BLOCK_V, VEC) + tile).to(tl.float32)
            r = tl.load(r_ptr + tl.multiple_of(r_base + i * BLOCK_V, VEC) + tile).to(tl.float32)
            mz, mr, sz, sr, u = _fold_two_rows(x, r, mz, mr, sz, sr, u, scale2)
        for i in range(tl.maximum(whole_end, 1), tl.cdiv(end, BLOCK_V)):
            rel = i * BLOCK_V + tile
            x = tl.load(x_ptr + x_base + rel, mask=rel < end, other=float("-inf")).to(tl.float32)
            r = tl.load(r_ptr + r_base + rel, mask=rel < end, other=float("-inf")).to(tl.float32)
            mz, mr, sz, sr, u = _fold_two_rows(x, r, mz, mr, sz, sr, u, scale2)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + tile
            col_mask = cols < V
            x = tl.load(x_ptr + x_off + cols, mask=col_mask, other=float("-inf")).to(tl.float32)
            r = tl.load(r_ptr + r_off + cols, mask=col_mask, other=float("-inf")).to(tl.float32)
            mz, mr, sz, sr, u = _fold_two_rows(x, r, mz, mr, sz, sr, u, scale2)
    Sz = tl.sum(sz, 0)
    Sr = tl.sum(sr, 0)
    ln2 = 0.6931471805599453
    log2_sz = tl.log2(Sz)
    log2_sr = tl.log2(Sr)
    tl.store(kl_ptr + row, tl.sum(u, 0) * inv_t / Sz + (log2_sr - log2_sz) * ln2)
    tl.store(lse_z_ptr + row, mz * inv_t + log2_sz * ln2)
    tl.store(lse_r_ptr + row, mr * inv_t + log2_sr * ln2)


_kl_divergence_fwd_tuned = row_autotune(_kl_divergence_fwd_kernel, _common._TWO_ROW_FWD_CANDIDATES)


@triton.jit
def _fold_two_rows(x, r, mz, mr, sz, sr, u, scale2):
    """One :func:`._common.row_tile` of both rows folded into the KL forward's state (its docstring's update)."""
    mz_new = tl.maximum(mz, tile_max(x))
    mr_new = tl.maximum(mr, tile_max(r))
    # all -inf so far: measure from 0 (the sums stay 0, no -inf - -inf)
    mz_use = tl.where(mz_new == float("-inf"), 0.0, mz_new)
    mr_use = tl.where(mr_new == float("-inf"), 0.0, mr_new)
    # the shifts (<= 0). From a -inf policy max dmz = -inf and az = 0 clears the (zero) sums;
    # dmr is 0 there instead, as u (+inf where q = 0 so far) is not rescaled by the reference
    dmz = mz - mz_use
    dmr = tl.where(mr == float("-inf"), 0.0, mr - mr_use)
    az = tl.exp2(dmz * scale2)
    # an underflowed rescale drops the old terms (a +inf u too: no 0·inf)
    u = tl.where(az > 0, az * (u + sz * (dmz - dmr)), 0.0)
    sz = sz * az
    sr = sr * tl.exp2(dmr * scale2)
    a = x - mz_use
    c = r - mr_use  # -inf where q = 0
    ez = tl.exp2(a * scale2)
    sz += tl.sum(ez, 0)
    sr += tl.sum(tl.exp2(c * scale2), 0)
    u += tl.sum(ez * tl.where(ez > 0, a - c, 0.0), 0)
    return mz_new, mr_new, sz, sr, u


@triton.jit
def _kl_divergence_bwd_kernel(
    dx_ptr,
    dr_ptr,
    x_ptr,
    r_ptr,
    g_ptr,
    kl_ptr,
    lse_z_ptr,
    lse_r_ptr,
    T,
    V,
    stride_xb,
    stride_xt,
    stride_rb,
    stride_rt,
    stride_dxb,
    stride_dxt,
    stride_drb,
    stride_drt,
    inv_t,
    NEED_REF_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGNED_BODY: tl.constexpr = False,
    VEC: tl.constexpr = 8,
):
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    b = row // T
    t = row - b * T
    # the four rows' offsets; with ALIGNED_BODY they agree modulo VEC (_common.body_aligned)
    x_off = b * stride_xb + t * stride_xt
    r_off = b * stride_rb + t * stride_rt
    dx_off = b * stride_dxb + t * stride_dxt
    dr_off = b * stride_drb + t * stride_drt
    g = tl.load(g_ptr + row).to(tl.float32) * inv_t
    kl = tl.load(kl_ptr + row).to(tl.float32)
    lse_z = tl.load(lse_z_ptr + row).to(tl.float32)
    lse_r = tl.load(lse_r_ptr + row).to(tl.float32)
    # a whole block unmasked with 16-byte accesses (ALIGNED_BODY: _common.block_columns), else under a mask
    whole, c0, cols, mask = block_columns(j, x_off, V, BLOCK_V, VEC, ALIGNED_BODY)
    if whole:
        ar = tl.arange(0, BLOCK_V)
        _kl_grad_block(dx_ptr, dr_ptr, x_ptr, r_ptr, tl.multiple_of(dx_off + c0, VEC) + ar,
                       tl.multiple_of(dr_off + c0, VEC) + ar, tl.multiple_of(x_off + c0, VEC) + ar,
                       tl.multiple_of(r_off + c0, VEC) + ar, 0, g, kl, lse_z, lse_r, inv_t, NEED_REF_GRAD, True)
    else:
        _kl_grad_block(dx_ptr, dr_ptr, x_ptr, r_ptr, dx_off + cols, dr_off + cols, x_off + cols, r_off + cols, mask, g,
                       kl, lse_z, lse_r, inv_t, NEED_REF_GRAD, False)


@triton.jit
def _kl_grad_block(dx_ptr, dr_ptr, x_ptr, r_ptr, dx_offs, dr_offs, x_offs, r_offs, mask, g, kl, lse_z, lse_r, inv_t,
                   NEED_REF_GRAD: tl.constexpr, WHOLE: tl.constexpr):
    """One block of the KL's gradients (``WHOLE``: every column in the row, no mask: 16-byte accesses where
    aligned)."""
    lp = load_cols(x_ptr, x_offs, mask, WHOLE) * inv_t - lse_z
    lq = load_cols(r_ptr, r_offs, mask, WHOLE) * inv_t - lse_r
    p = tl.exp2(lp * 1.4426950408889634)
    dz = tl.where(p > 0, g * p * (lp - lq - kl), 0.0)
    # 0 in a row of zero upstream gradient (a masked row, whose KL may be infinite: not 0·inf). (Two selects: the
    # interpreter cannot `&` a row's scalar condition with a block's.)
    dz = tl.where(g != 0, dz, 0.0)
    dz = tl.where(lp != lp, lp, dz)  # NaN logits stay NaN
    store_cols(dx_ptr, dx_offs, dz, mask, WHOLE)
    if NEED_REF_GRAD:
        q = tl.exp2(lq * 1.4426950408889634)
        store_cols(dr_ptr, dr_offs, g * (q - p), mask, WHOLE)


def _check_rows(name: str, rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(2) != 1:
        raise ValueError(f"{name} must be [B, T, V] with unit vocab stride, got shape {tuple(rows.shape)} strides {rows.stride()}")


def kl_divergence_fwd(rows: torch.Tensor, ref_rows: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows, ref_rows[B, T, V]`` -> ``(kl, lse_z, lse_r)``, each ``[B, T]`` float32."""
    _check_rows("rows", rows)
    _check_rows("ref_rows", ref_rows)
    B, T, V = rows.shape
    dtype = torch.float64 if torch.float64 in (rows.dtype, ref_rows.dtype) else torch.float32
    kl = _common.alloc((B, T), dtype, rows.device)
    lse_z = _common.alloc(kl.shape, kl.dtype, kl.device)
    lse_r = _common.alloc(kl.shape, kl.dtype, kl.device)
    if B * T == 0:
        return kl, lse_z, lse_r
    with device_guard(rows):
        launch_row_kernel(
            _kl_divergence_fwd_kernel, _kl_divergence_fwd_tuned, (B * T,), rows, ref_rows, kl, lse_z, lse_r, T, V,
            rows.stride(0), rows.stride(1), ref_rows.stride(0), ref_rows.stride(1), 1.0 / float(temperature),
            vocab=V, device=rows.device, **body_walk(rows, ref_rows),
        )
    return kl, lse_z, lse_r


def kl_divergence_bwd(
    grad: torch.Tensor,
    rows: torch.Tensor,
    ref_rows: torch.Tensor,
    kl: torch.Tensor,
    lse_z: torch.Tensor,
    lse_r: torch.Tensor,
    temperature: float,
    need_ref_grad: bool,
    out: Optional[torch.Tensor] = None,
    ref_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dlogits[B, T, V], dref[B, T, V] or None)`` in each input's dtype.

    New contiguous tensors, or written into ``out`` / ``ref_out`` (``[B, T, V]``,
    unit vocab stride, any row strides: rows of a larger gradient).
    """
    _check_rows("rows", rows)
    _check_rows("ref_rows", ref_rows)
    B, T, V = rows.shape
    flat = [t.reshape(B * T).contiguous() for t in (grad, kl, lse_z, lse_r)]
    dx = _common.alloc((B, T, V), rows.dtype, rows.device) if out is None else _check_out(out, rows)
    dr = None
    if need_ref_grad:
        dr = _common.alloc((B, T, V), ref_rows.dtype, rows.device) if ref_out is None else _check_out(ref_out, ref_rows)
    if dx.numel() == 0:
        return dx, dr
    block, warps = vocab_config(V, rows.device, "bwd")
    with device_guard(rows):
        walk = body_walk(rows, ref_rows, dx, *([dr] if need_ref_grad else []))
        _kl_divergence_bwd_kernel[(B * T, _common.column_blocks(V, block, walk))](
            dx, dr if need_ref_grad else dx, rows, ref_rows, *flat, T, V, rows.stride(0), rows.stride(1),
            ref_rows.stride(0), ref_rows.stride(1), dx.stride(0), dx.stride(1),
            (dr if need_ref_grad else dx).stride(0), (dr if need_ref_grad else dx).stride(1), 1.0 / float(temperature),
            NEED_REF_GRAD=bool(need_ref_grad), BLOCK_V=block, num_warps=warps, **walk,
        )
    return dx, dr


# ---------------------------------------------------------------- estimators


@triton.jit
def _kl_estimate_fwd_kernel(
    logp_ptr, ref_ptr, out_ptr, n, clamp, KL_EST: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = kl_k(logp, ref, KL_EST)
    if HAS_CLAMP:
        k = tl.where(k > clamp, clamp, tl.where(k < -clamp, -clamp, k))
    tl.store(out_ptr + offs, k.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kl_estimate_bwd_kernel(
    g_ptr, logp_ptr, ref_ptr, dlogp_ptr, dref_ptr, n, clamp, KL_EST: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = g * kl_k_dlogp(logp, ref, KL_EST)
    if HAS_CLAMP:
        k = kl_k(logp, ref, KL_EST)
        d = tl.where((k >= -clamp) & (k <= clamp), d, 0.0)  # clamp passes the gradient on its closed interval
    tl.store(dlogp_ptr + offs, d.to(dlogp_ptr.dtype.element_ty), mask=mask)
    tl.store(dref_ptr + offs, (-d).to(dref_ptr.dtype.element_ty), mask=mask)


def _elementwise_block(n: int, device: torch.device) -> int:
    return 1024 if device.type == "cuda" else max(16, min(1024, next_pow2(n)))


def kl_estimate_fwd(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: Optional[float]) -> torch.Tensor:
    """Elementwise estimator, same shape as ``logp``, dtype ``promote(logp, ref_logp)`` (fp32 math)."""
    out = _common.alloc(logp.shape, torch.promote_types(logp.dtype, ref_logp.dtype), logp.device)
    n = out.numel()
    if n == 0:
        return out
    block = _elementwise_block(n, logp.device)
    with device_guard(logp):
        _kl_estimate_fwd_kernel[(triton.cdiv(n, block),)](
            logp.contiguous(), ref_logp.contiguous(), out, n, float(clamp or 0.0),
            KL_EST=KL_EST_CODES[estimator], HAS_CLAMP=clamp is not None, BLOCK=block,
        )
    return out


def kl_estimate_bwd(
    grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogp, dref_logp)`` in the inputs' dtypes."""
    dlogp = _common.alloc(logp.shape, logp.dtype, logp.device)
    dref = _common.alloc(ref_logp.shape, ref_logp.dtype, logp.device)
    n = dlogp.numel()
    if n == 0:
        return dlogp, dref
    block = _elementwise_block(n, logp.device)
    with device_guard(logp):
        _kl_estimate_bwd_kernel[(triton.cdiv(n, block),)](
            grad.contiguous(), logp.contiguous(), ref_logp.contiguous(), dlogp, dref, n, float(clamp or 0.0),
            KL_EST=KL_EST_CODES[estimator], HAS_CLAMP=clamp is not None, BLOCK=block,
        )
    return dlogp, dref
