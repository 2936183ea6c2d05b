"""Shared pieces of the Triton kernels: block-size table, autotuning and jitted helpers.

Row reductions keep the online softmax statistics of a row in one read: a
running max ``m``, ``s = Σ exp(z - m)`` and ``t = Σ exp(z - m)·(z - m)``.
Keeping ``t`` relative to the running max makes the entropy ``log s - t / s``
exact even for logits of size 1e4. ``row_softmax_stats`` (logprobs, PPO) shares
one max per program, as does the two-row KL forward (one per row, in ``kl.py``).
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
# V=151936, bf16 (benchmarks/tune_triton.py; logs in benchmarks/results/nvidia-h100-80gb-hbm3/logs/):
# block-max logprobs forward 2048x4 91% of the copy bandwidth, 4096x4 89%, 1024x4 86%, 4096x8 80%;
# the two-row KL forward (old per-lane state; block-max now, unmeasured) 1024x8, 512x4 71%, 2048x4 53%.
# The best differs by op, dtype, vocabulary and chip, so the candidates are timed once per (V, dtypes) on first use.
# On an H200 (4.3 TB/s) the best of those reached only 64-75% for the logprobs and PPO forwards, while
# Liger-Kernel's GRPO forward, one warp per row with 2048-wide blocks (64 values per thread in flight, and
# no cross-warp reduction), ran at 98.6% (benchmarks/results/nvidia-h200/NOTES.md): hence the one- and
# two-warp candidates. Unmeasured here until a GPU run; the autotuner keeps whichever is fastest.
_ROW_FWD_CANDIDATES = ((4096, 4), (2048, 4), (2048, 8), (1024, 4), (1024, 8), (512, 4), (256, 4), (128, 4),
                       (4096, 1), (2048, 1), (1024, 1), (4096, 2), (2048, 2))


# Rows shorter than this skip the one- and two-warp candidates: those pay off for long vocabularies (Liger's case
# was V = 151936), and each candidate is one more compile on a key's first call.
_FEW_WARPS_MIN_V = 32768


def _prune_row_configs(configs, named_args, **kwargs):
    """Keep blocks no wider than the row (and, for long rows, no narrower than 512); the one- and two-warp
    candidates only for rows of at least ``_FEW_WARPS_MIN_V``."""
    v = int(named_args["V"])
    cap = max(128, next_pow2(v))
    floor = min(cap, 512)
    return [c for c in configs if floor <= c.kwargs["BLOCK_V"] <= cap and (c.num_warps >= 4 or v >= _FEW_WARPS_MIN_V)]


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
def row_softmax_stats(x_row, V, scale2, BLOCK_V: tl.constexpr):
    """One read of a row of ``V`` logits at ``x_row``: ``(mx, S, T2)`` with ``scale2 = log2(e) / temperature``.

    ``mx = max x`` (raw logits), and in log2 units ``d = (x - mx)·scale2``:
    ``S = Σ 2^d = Σ exp(z - max z)`` and ``T2 = Σ 2^d·d``. A *block-max* state:
    the running max is one scalar for the whole program, raised once per block by
    the block's max, while each lane keeps its own ``s`` and ``t``. Per value that
    is a subtract, a multiply, a NaN-propagating max, one exp2 and three FMAs; the
    lanes are summed once at the end (they share the max). On an H100 (bf16,
    V = 151936) this ran at about 90% of the copy bandwidth against 84% for a
    per-lane max, whose selects made the loop instruction-bound. ``x - mx`` is
    exact for bf16/fp16 logits, so large logits (|z| ~ 1e5) lose nothing to the
    scaling. ``d`` is floored at -256 so that an underflowed term adds exactly 0
    to ``t`` (no 0·(-inf)); NaN passes the floor and makes the row's sums NaN.
    """
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)
    s = tl.zeros([BLOCK_V], tl.float32)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: sums stay 0
        alpha = tl.exp2((m - m_use) * scale2)
        dm = tl.where(m == float("-inf"), 0.0, (m - m_use) * scale2)
        d = tl.maximum((x - m_use) * scale2, -256.0, propagate_nan=tl.PropagateNan.ALL)
        e = tl.exp2(d)
        t = alpha * (t + s * dm) + e * d
        s = s * alpha + e
        m = m_new
    return m, tl.sum(s, 0), tl.sum(t, 0)


@triton.jit
def row_logp_entropy_lse(x_row, y, V, inv_t, BLOCK_V: tl.constexpr):
    """``(logp, entropy, lse)`` of row ``x_row`` at target ``y`` under ``softmax(x·inv_t)``, one read of the row.

    With ``(mx, S, T2)`` of :func:`row_softmax_stats`: ``lse = mx·inv_t + ln S``
    (``mx·inv_t`` rounds exactly as the backward's ``z = x·inv_t`` does at the
    max), ``H = ln2·(log2 S - T2 / S)``, ``logp = (x[y] - mx)·inv_t - ln S``. An
    out-of-range ``y`` is never read and gives a NaN ``logp``.
    """
    mx, S, T2 = row_softmax_stats(x_row, V, inv_t * 1.4426950408889634, BLOCK_V)
    ln2 = 0.6931471805599453
    log2_s = tl.log2(S)
    in_range = (y >= 0) & (y < V)
    xy = tl.load(x_row + tl.where(in_range, y, 0), mask=in_range, other=0.0).to(tl.float32)
    logp = tl.where(in_range, (xy - mx) * inv_t - log2_s * ln2, float("nan"))
    return logp, (log2_s - T2 / S) * ln2, mx * inv_t + log2_s * ln2


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
