"""Shared pieces of the Triton kernels: block-size table and jitted helpers.

The vocabulary reductions keep one online-softmax state *per lane* of the
block (lane ``i`` sees columns ``i, i + BLOCK_V, i + 2·BLOCK_V, ...``): a
running max ``m``, ``s = Σ exp(z - m)`` and ``t = Σ exp(z - m)·(z - m)``. When a
new value ``z`` arrives exactly one exponential is needed,
``x = exp(-|z - m|)``: it is either the new term (``z <= m``) or the rescale
factor of the old sums (``z > m``). The loop over the vocabulary therefore has
no cross-thread reduction at all; the lanes are merged once at the end.
Keeping ``t`` relative to the running max makes the entropy
``log s - t / s`` exact even for logits of size 1e4.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Interpreter block: small so the CPU tests cross several vocabulary blocks.
_INTERPRET_BLOCK_V = 64


def interpreting() -> bool:
    """True when kernels run on the Triton CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def vocab_config(vocab: int, device: torch.device, kind: str = "fwd"):
    """``(BLOCK_V, num_warps)`` for a kernel walking rows of ``vocab`` columns.

    A small table instead of autotune: the forward reductions are one program
    per row and bandwidth-bound, so a wide block (4096) with 8 warps keeps
    enough bytes in flight; ``kind="kl"`` carries two rows' state per lane and
    uses 2048-wide blocks; the backward is elementwise over a 2-D grid. The
    table is reasoned from register counts of the sm_90 compile, not yet tuned
    on a GPU. The
    interpreter (CPU tensors) uses 64-wide blocks, or ``RLHF_KERNELS_TRITON_BLOCK_V``.
    """
    override = os.environ.get("RLHF_KERNELS_TRITON_BLOCK_V")
    if device.type != "cuda" or override:
        block = int(override) if override else _INTERPRET_BLOCK_V
        return max(16, min(next_pow2(block), next_pow2(vocab))), 4
    if kind == "bwd":
        block = min(max(next_pow2(vocab), 128), 4096)
        return block, (8 if block >= 2048 else 4)
    if kind == "kl":
        # two rows of lane state: 2048 x 8 warps compiles to 77 registers (sm_90), three programs per SM
        block = min(max(next_pow2(vocab), 128), 2048)
        return block, (8 if block >= 1024 else 4)
    # 4096 x 8 warps: 80 registers, no spills (sm_90, triton 3.8), 32 bytes of loads in flight per thread
    block = min(max(next_pow2(vocab), 128), 4096)
    return block, (8 if block >= 1024 else 4)


# Tests set this to fill every launcher output with NaN first, proving the kernels write all of it.
POISON_OUTPUTS = False


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when ``POISON_OUTPUTS`` is set)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU (multi-GPU safe); no-op for CPU tensors."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@triton.jit
def online_lane_update(z, m, s, t):
    """Fold ``z`` (natural units) into the per-lane state ``(m, s, t)``.

    ``-inf`` entries contribute nothing; a NaN makes ``s`` NaN (propagates).
    """
    gt = z > m
    delta = tl.where(gt, m - z, z - m)
    delta = tl.where(z == float("-inf"), float("-inf"), delta)
    x = tl.exp2(delta * 1.4426950408889634)
    # x·delta with the convention 0·(-inf) = 0
    xd = tl.where(x > 0, x * delta, 0.0)
    s_new = tl.where(gt, s * x + 1.0, s + x)
    t_new = tl.where(gt, x * t + s * xd, t + xd)
    m_new = tl.where(gt, z, m)
    return m_new, s_new, t_new


@triton.jit
def merge_lanes(m, s, t):
    """Merge per-lane states into the row's ``(M, S, T)``: ``lse = M + log S``, ``H = log S - T / S``."""
    M = tl.max(m, axis=0)
    live = s != 0.0  # lanes that saw a finite value (or a NaN, which must propagate)
    d = tl.where(live, m - M, 0.0)
    w = tl.where(live, tl.exp2(d * 1.4426950408889634), 0.0)
    S = tl.sum(w * s, axis=0)
    T = tl.sum(tl.where(live, w * (t + s * d), 0.0), axis=0)
    return M, S, T


@triton.jit
def row_softmax_stats(x_row, V, inv_t, BLOCK_V: tl.constexpr):
    """One read of a row of ``V`` logits at ``x_row``: ``(M, S, T)`` of ``z = x·inv_t``."""
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m, s, t = online_lane_update(z, m, s, t)
    return merge_lanes(m, s, t)


@triton.jit
def expm1_minus_x(d):
    """``exp(d) - 1 - d`` without cancellation near 0 (Taylor to d^12 for |d| < 0.5)."""
    p = 1.0 / 479001600.0
    p = p * d + 1.0 / 39916800.0
    p = p * d + 1.0 / 3628800.0
    p = p * d + 1.0 / 362880.0
    p = p * d + 1.0 / 40320.0
    p = p * d + 1.0 / 5040.0
    p = p * d + 1.0 / 720.0
    p = p * d + 1.0 / 120.0
    p = p * d + 1.0 / 24.0
    p = p * d + 1.0 / 6.0
    p = p * d + 0.5
    series = p * d * d
    direct = tl.exp(d) - 1.0 - d
    return tl.where(tl.abs(d) < 0.5, series, direct)


@triton.jit
def kl_k(logp, ref, KL_EST: tl.constexpr):
    """Sample KL estimator (1: k1, 2: k2, 3: k3) with ``d = ref - logp``."""
    d = ref - logp
    if KL_EST == 1:
        k = -d
    elif KL_EST == 2:
        k = 0.5 * d * d
    else:
        k = expm1_minus_x(d)
    return k


@triton.jit
def kl_k_dlogp(logp, ref, KL_EST: tl.constexpr):
    """``∂k/∂logp`` (``∂k/∂ref`` is its negative)."""
    d = ref - logp
    if KL_EST == 1:
        g = d * 0.0 + 1.0
    elif KL_EST == 2:
        g = -d
    else:
        g = -(d + expm1_minus_x(d))  # -expm1(d)
    return g


KL_EST_CODES = {"k1": 1, "k2": 2, "k3": 3}
