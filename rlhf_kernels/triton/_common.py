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
    """``(BLOCK_V, num_warps)`` for a kernel walking rows of ``vocab`` columns (the untuned table).

    Used by the backward kernels (elementwise over a 2-D grid: 4096 x 8 warps ran
    at about 90% of the copy bandwidth on an H100), by the interpreter (CPU
    tensors: 64-wide blocks so tests cross several vocabulary blocks, or
    ``RLHF_KERNELS_TRITON_BLOCK_V``), and as the fallback of the forward row
    reductions, which otherwise go through :func:`row_autotune`.
    """
    override = os.environ.get("RLHF_KERNELS_TRITON_BLOCK_V")
    if device.type != "cuda" or override:
        block = int(override) if override else _INTERPRET_BLOCK_V
        return max(16, min(next_pow2(block), next_pow2(vocab))), 4
    if kind == "bwd":
        block = min(max(next_pow2(vocab), 128), 4096)
        return block, (8 if block >= 2048 else 4)
    # forward row reductions: 1024 x 4 warps (8 values per thread) was the fastest measured (H100, bf16)
    block = min(max(next_pow2(vocab), 128), 1024)
    return block, 4


# Forward row reductions (one program per row, bandwidth-bound). Measured on an H100 at N=8192,
# V=151936, bf16 (benchmarks/tune_triton.py; log in benchmarks/results/nvidia-h100-80gb-hbm3/logs/run2):
# 1024x4 and 2048x8 reached 84% of the copy bandwidth, 4096x8 61%, 8192x16 45%: with more values per
# thread the per-lane state costs registers and occupancy, so fewer rows are in flight per SM. The best
# differs by dtype, vocabulary and chip, so the candidates are timed once per (V, dtype) on first use.
_ROW_FWD_CANDIDATES = ((4096, 8), (2048, 8), (1024, 4), (512, 4), (256, 4), (128, 4))


def _prune_row_configs(configs, named_args, **kwargs):
    """Keep blocks no wider than the row (and, for long rows, no narrower than 512)."""
    cap = max(128, next_pow2(int(named_args["V"])))
    floor = min(cap, 512)
    return [c for c in configs if floor <= c.kwargs["BLOCK_V"] <= cap]


def row_autotune(kernel):
    """``kernel`` autotuned over :data:`_ROW_FWD_CANDIDATES`, keyed on ``V`` (and the tensors' dtypes)."""
    configs = [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in _ROW_FWD_CANDIDATES]
    return triton.autotune(configs=configs, key=["V"], prune_configs_by={"early_config_prune": _prune_row_configs})(kernel)


def launch_row_kernel(kernel, tuned, grid, *args, vocab: int, device: torch.device, **constexprs) -> None:
    """Launch a forward row reduction: ``tuned`` on a GPU, else ``kernel`` with :func:`vocab_config`'s block."""
    if device.type == "cuda" and not os.environ.get("RLHF_KERNELS_TRITON_BLOCK_V"):
        tuned[grid](*args, **constexprs)
        return
    block, warps = vocab_config(vocab, device, "fwd")
    kernel[grid](*args, BLOCK_V=block, num_warps=warps, **constexprs)


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
