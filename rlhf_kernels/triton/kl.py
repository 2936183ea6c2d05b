"""Triton kernels for the KL ops: exact full-vocabulary KL and the k1/k2/k3 estimators.

``kl_divergence`` forward, one program per row, one read of both rows. With
``z = x / T``, ``r = x_ref / T``, each lane keeps online states for both rows
(``mz, sz`` and ``mr, sr``) and ``u = Σ exp(z - mz)·((z - mz) - (r - mr))``,
relative to both running maxima, so that rows equal up to a constant give an
exactly-zero KL (no ``lse_z - lse_r`` cancellation)::

    KL = U / S_z - log S_z + log S_r = Σ p·(log p - log q)

Backward (2-D grid, rows x vocab blocks), rebuilding ``log p = z - lse_z`` and
``log q = r - lse_r`` from the saved per-row values::

    dz = g·p·(log p - log q - KL) / T;    dr = g·(q - p) / T   (when wanted)

``kl_estimate`` is elementwise: ``d = ref - logp``; k1 ``= -d``, k2 ``= d²/2``,
k3 ``= exp(d) - 1 - d`` (series near 0), optional clamp to ``[-c, c]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import KL_EST_CODES, device_guard, kl_k, kl_k_dlogp, launch_row_kernel, next_pow2, row_autotune, vocab_config
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
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + b * stride_xb + t * stride_xt
    r_row = r_ptr + b * stride_rb + t * stride_rt
    mz = tl.full([BLOCK_V], float("-inf"), tl.float32)
    mr = tl.full([BLOCK_V], float("-inf"), tl.float32)
    sz = tl.zeros([BLOCK_V], tl.float32)
    sr = tl.zeros([BLOCK_V], tl.float32)
    u = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = tl.load(x_row + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_t
        r = tl.load(r_row + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_t
        # reference row: plain online (max, Σexp)
        gt_r = r > mr
        dr = tl.where(gt_r, mr - r, r - mr)
        dr = tl.where(r == float("-inf"), float("-inf"), dr)
        xr = tl.exp2(dr * 1.4426950408889634)
        sr = tl.where(gt_r, sr * xr + 1.0, sr + xr)
        mr_new = tl.where(gt_r, r, mr)
        # u relative to the new reference max: shifts by sz·(mr_new - mr)
        shift_r = tl.where(gt_r & (mr > float("-inf")), mr_new - mr, 0.0)
        u = u + sz * shift_r
        mr = mr_new
        # policy row, carrying u along with the rescale
        gt_z = z > mz
        dz = tl.where(gt_z, mz - z, z - mz)
        dz = tl.where(z == float("-inf"), float("-inf"), dz)
        xz = tl.exp2(dz * 1.4426950408889634)
        xdz = tl.where(xz > 0, xz * dz, 0.0)
        z_rel = tl.where(gt_z, 0.0, dz)  # z - mz_new
        e = tl.where(gt_z, 1.0, xz)
        r_rel = tl.where(r == float("-inf"), float("-inf"), r - mr)  # q = 0 where p > 0: KL = +inf
        term = tl.where(z == float("-inf"), 0.0, e * (z_rel - r_rel))
        # underflowed weights drop their terms (the 0·x = 0 convention of Σ p·(log p - log q))
        u = tl.where(gt_z, tl.where(xz > 0, xz * u, 0.0) + sz * xdz, u) + term
        sz = tl.where(gt_z, sz * xz + 1.0, sz + xz)
        mz = tl.where(gt_z, z, mz)
    Mz = tl.max(mz, axis=0)
    Mr = tl.max(mr, axis=0)
    live_z = sz != 0.0
    dmz = tl.where(live_z, mz - Mz, 0.0)
    wz = tl.where(live_z, tl.exp2(dmz * 1.4426950408889634), 0.0)
    Sz = tl.sum(wz * sz, axis=0)
    U = tl.sum(tl.where(live_z & (wz > 0), wz * (u + sz * (dmz - (mr - Mr))), 0.0), axis=0)
    live_r = sr != 0.0
    wr = tl.where(live_r, tl.exp2(tl.where(live_r, mr - Mr, 0.0) * 1.4426950408889634), 0.0)
    Sr = tl.sum(wr * sr, axis=0)
    log_sz = tl.log(Sz)
    log_sr = tl.log(Sr)
    tl.store(kl_ptr + row, U / Sz - log_sz + log_sr)
    tl.store(lse_z_ptr + row, Mz + log_sz)
    tl.store(lse_r_ptr + row, Mr + log_sr)


_kl_divergence_fwd_tuned = row_autotune(_kl_divergence_fwd_kernel)


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
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    b = row // T
    t = row - b * T
    z = tl.load(x_ptr + b * stride_xb + t * stride_xt + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_t
    r = tl.load(r_ptr + b * stride_rb + t * stride_rt + cols, mask=col_mask, other=float("-inf")).to(tl.float32) * inv_t
    g = tl.load(g_ptr + row).to(tl.float32) * inv_t
    kl = tl.load(kl_ptr + row).to(tl.float32)
    lp = z - tl.load(lse_z_ptr + row).to(tl.float32)
    lq = r - tl.load(lse_r_ptr + row).to(tl.float32)
    p = tl.exp2(lp * 1.4426950408889634)
    dz = tl.where(p > 0, g * p * (lp - lq - kl), 0.0)
    dz = tl.where(lp != lp, lp, dz)  # NaN logits stay NaN
    tl.store(dx_ptr + b * stride_dxb + t * stride_dxt + cols, dz.to(dx_ptr.dtype.element_ty), mask=col_mask)
    if NEED_REF_GRAD:
        q = tl.exp2(lq * 1.4426950408889634)
        dr = (g * (q - p)).to(dr_ptr.dtype.element_ty)
        tl.store(dr_ptr + b * stride_drb + t * stride_drt + cols, dr, mask=col_mask)


def _check_rows(name: str, rows: torch.Tensor) -> None:
    if rows.dim() != 3 or rows.stride(2) != 1:
        raise ValueError(f"{name} must be [B, T, V] with unit vocab stride, got shape {tuple(rows.shape)} strides {rows.stride()}")


def kl_divergence_fwd(rows: torch.Tensor, ref_rows: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
            vocab=V, device=rows.device,
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
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
        _kl_divergence_bwd_kernel[(B * T, triton.cdiv(V, block))](
            dx, dr if need_ref_grad else dx, rows, ref_rows, *flat, T, V, rows.stride(0), rows.stride(1),
            ref_rows.stride(0), ref_rows.stride(1), dx.stride(0), dx.stride(1),
            (dr if need_ref_grad else dx).stride(0), (dr if need_ref_grad else dx).stride(1), 1.0 / float(temperature),
            NEED_REF_GRAD=bool(need_ref_grad), BLOCK_V=block, num_warps=warps,
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
) -> Tuple[torch.Tensor, torch.Tensor]:
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
