"""The loss aggregation of Triton's fused PPO step: the per-token weights before the kernel, the loss and the logged
means after it, each one launch (``csrc/cuda/ppo_aggregate.cuh`` is the CUDA step's twin).

Every ``loss_agg`` is linear in the per-token term, so ``loss = Σ w·term`` with, for a mask ``m[B, T]``::

    token-mean                w = m / Σ m
    seq-mean-token-mean       w = (m / Σ_t m) / (number of rows with Σ_t m > 0)
    seq-mean-token-sum        w = m / B
    seq-mean-token-sum-norm   w = m / (B·T)

and 0 where a denominator is 0 (``ops.ppo.aggregation_weights``). The means users log are token means over the mask
whatever ``loss_agg`` is: ``clip_frac = Σ m·clipped / Σ m``, ``approx_kl = Σ m·½(logp - old_logp)² / Σ m`` (0 when
``Σ m = 0``). A token of weight (or mask) 0 adds nothing, even where its term or log-prob is not finite
(``reference.masked``).

Why kernels: in PyTorch these are about 5 small kernels before the fused kernel and 13 after it, each a Python call
and a launch; at a PPO micro-batch the step is bound by the host (Triton's step at bf16 4096 x 50257 on an H200: 2.05
ms of host time for 0.70 ms of kernels, run 6). Each kernel here is one program that walks the ``[B, T]`` tokens (tens
of KB at a micro-batch) in a fixed order, so the results are the same bits on every call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_guard

# loss_agg codes (the order of reference.LOSS_AGG_MODES, as csrc/cuda/launchers.h's LossAgg)
_TOKEN_MEAN, _SEQ_MEAN_TOKEN_MEAN, _SEQ_MEAN_TOKEN_SUM, _SEQ_MEAN_TOKEN_SUM_NORM = 0, 1, 2, 3
_BLOCK = 2048  # values per program and step: 8 per thread at 8 warps


@triton.jit
def _divide_or_zero(num, den):
    """``num / den``, 0 where ``den == 0`` (a 0 denominator is replaced before the division: no 0/0 computed)."""
    return tl.where(den != 0.0, num / tl.where(den != 0.0, den, 1.0), 0.0)


# (do_not_specialize: Triton makes an integer argument equal to 1 a compile-time constant, which has no .to(); a
# single sequence (rows = 1) or token is an ordinary call here)
@triton.jit(do_not_specialize=["rows", "cols"])
def _loss_weights_kernel(mask_ptr, w_ptr, total_ptr, rows, cols, AGG: tl.constexpr, BLOCK: tl.constexpr,
                         ROWS_B: tl.constexpr, COLS_B: tl.constexpr):
    """One program: ``w[rows·cols]`` float32 from ``mask`` (any dtype, contiguous ``[rows, cols]``) and ``Σ m``.

    The per-row sums of ``seq-mean-token-mean`` walk ``[ROWS_B, COLS_B]`` tiles, so that short rows are summed
    ``ROWS_B`` at a time (a row at a time, 128 rows of 128 tokens took 256 dependent iterations)."""
    n = rows * cols
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(mask_ptr + offs, mask=offs < n, other=0).to(tl.float32)
    total = tl.sum(acc, 0)
    tl.store(total_ptr, total)
    if AGG == 1:  # seq-mean-token-mean: m / Σ_t m per row, then / the number of non-empty rows (two roundings)
        non_empty = tl.zeros([ROWS_B], tl.float32)
        for r0 in range(0, rows, ROWS_B):
            r = r0 + tl.arange(0, ROWS_B)
            tile_acc = tl.zeros([ROWS_B, COLS_B], tl.float32)
            for c0 in range(0, cols, COLS_B):
                c = c0 + tl.arange(0, COLS_B)
                inside = (r[:, None] < rows) & (c[None, :] < cols)
                tile_acc += tl.load(mask_ptr + r[:, None] * cols + c[None, :], mask=inside, other=0).to(tl.float32)
            row_sum = tl.sum(tile_acc, 1)
            non_empty += tl.where((row_sum > 0.0) & (r < rows), 1.0, 0.0)
            for c0 in range(0, cols, COLS_B):
                c = c0 + tl.arange(0, COLS_B)
                inside = (r[:, None] < rows) & (c[None, :] < cols)
                m = tl.load(mask_ptr + r[:, None] * cols + c[None, :], mask=inside, other=0).to(tl.float32)
                tl.store(w_ptr + r[:, None] * cols + c[None, :], _divide_or_zero(m, row_sum[:, None]), mask=inside)
        count = tl.sum(non_empty, 0)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            w = tl.load(w_ptr + offs, mask=offs < n, other=0.0)
            tl.store(w_ptr + offs, _divide_or_zero(w, count), mask=offs < n)
    else:
        if AGG == 0:
            den = total
        elif AGG == 2:
            den = rows.to(tl.float32)
        else:
            den = (rows * cols).to(tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = tl.load(mask_ptr + offs, mask=offs < n, other=0).to(tl.float32)
            tl.store(w_ptr + offs, _divide_or_zero(m, den), mask=offs < n)


@triton.jit(do_not_specialize=["n"])
def _loss_sums_kernel(w_ptr, mask_ptr, total_ptr, term_ptr, clip_ptr, logp_ptr, old_ptr, loss_ptr, means_ptr, n,
                      BLOCK: tl.constexpr):
    """One program: ``loss = Σ w·term`` and the two token means over the mask, weight- / mask-0 tokens skipped."""
    loss = tl.zeros([BLOCK], tl.float32)
    clipped = tl.zeros([BLOCK], tl.float32)
    half_sq = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        m = tl.load(mask_ptr + offs, mask=inside, other=0).to(tl.float32)
        term = tl.load(term_ptr + offs, mask=inside, other=0.0)
        d = tl.load(logp_ptr + offs, mask=inside, other=0.0) - tl.load(old_ptr + offs, mask=inside, other=0.0)
        loss += tl.where(w != 0.0, w * term, 0.0)
        clipped += tl.where(m != 0.0, m * tl.load(clip_ptr + offs, mask=inside, other=0.0), 0.0)
        half_sq += tl.where(m != 0.0, m * (d * (0.5 * d)), 0.0)
    total = tl.load(total_ptr)
    tl.store(loss_ptr, tl.sum(loss, 0))
    tl.store(means_ptr, _divide_or_zero(tl.sum(clipped, 0), total))
    tl.store(means_ptr + 1, _divide_or_zero(tl.sum(half_sq, 0), total))


_CODES = {"token-mean": _TOKEN_MEAN, "seq-mean-token-mean": _SEQ_MEAN_TOKEN_MEAN,
          "seq-mean-token-sum": _SEQ_MEAN_TOKEN_SUM, "seq-mean-token-sum-norm": _SEQ_MEAN_TOKEN_SUM_NORM}


def _block(n: int) -> int:
    return max(16, min(_BLOCK, triton.next_power_of_2(max(n, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _mask_values(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` contiguous, a bool one viewed as its bytes (Triton's bool pointers vary across versions)."""
    m = mask.contiguous()
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def loss_weights(mask: torch.Tensor, loss_agg: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, total)``: the float32 weights of ``mask[B, T]`` (any dtype; shaped like it) under ``loss_agg`` and
    ``Σ m`` (a float32 one-element tensor), in one launch."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if loss_agg not in _CODES:
        raise ValueError(f"loss_agg must be one of {tuple(_CODES)}, got {loss_agg!r}")
    m = _mask_values(mask)
    rows, cols = m.shape
    w = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    total = torch.empty(1, dtype=torch.float32, device=m.device)
    block = _block(rows * cols)
    cols_b = min(block, triton.next_power_of_2(max(cols, 1)))
    with device_guard(m):
        _loss_weights_kernel[(1,)](m, w, total, rows, cols, AGG=_CODES[loss_agg], BLOCK=block,
                                   ROWS_B=block // cols_b, COLS_B=cols_b, num_warps=_warps(block))
    return w, total


def loss_sums(weights, mask, total, term, clipped, logp, old_logp) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, means)``: ``Σ w·term`` (a float32 scalar) and ``[clip_frac, approx_kl]`` from the ``[B, T]`` weights
    and mask of ``loss_weights`` and the fused kernel's per-token float32 outputs, in one launch."""
    m = _mask_values(mask)
    n = m.numel()
    loss = torch.empty((), dtype=torch.float32, device=m.device)
    means = torch.empty(2, dtype=torch.float32, device=m.device)
    with device_guard(m):
        block = _block(n)
        _loss_sums_kernel[(1,)](weights, m, total, term.contiguous(), clipped.contiguous(), logp.contiguous(),
                                old_logp.float().contiguous(), loss, means, n, BLOCK=block, num_warps=_warps(block))
    return loss, means
