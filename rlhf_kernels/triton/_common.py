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
from typing import Optional

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


def block_v_override() -> Optional[int]:
    """The ``RLHF_KERNELS_TRITON_BLOCK_V`` setting: a fixed vocabulary block for every Triton kernel (rounded up
    to a power of two, at least 16), or ``None`` when unset (autotuned on a GPU, 64 under the interpreter)."""
    text = os.environ.get("RLHF_KERNELS_TRITON_BLOCK_V", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"RLHF_KERNELS_TRITON_BLOCK_V must be a positive whole number of columns, got {text!r}")
    return int(text)


def vocab_config(vocab: int, device: torch.device, kind: str = "fwd"):
    """``(BLOCK_V, num_warps)`` for a kernel walking rows of ``vocab`` columns (the untuned table).

    Used by the backward kernels (elementwise over a 2-D grid: 4096 x 8 warps ran
    at about 90% of the copy bandwidth on an H100), by the interpreter (CPU
    tensors: 64-wide blocks so tests cross several vocabulary blocks, or
    ``RLHF_KERNELS_TRITON_BLOCK_V``), and as the fallback of the forward row
    reductions, which otherwise go through :func:`row_autotune`.
    """
    override = block_v_override()
    if device.type != "cuda" or override:
        block = override or _INTERPRET_BLOCK_V
        return max(16, min(next_pow2(block), next_pow2(vocab))), 4
    if kind == "bwd":
        block = min(max(next_pow2(vocab), 128), 4096)
        return block, (8 if block >= 2048 else 4)
    # forward row reductions: 1024 x 4 warps (8 values per thread) was the fastest measured (H100, bf16)
    block = min(max(next_pow2(vocab), 128), 1024)
    return block, 4


# Forward row reductions (one program per row, bandwidth-bound): (BLOCK_V, LANES_V, num_warps). Each loop
# iteration loads BLOCK_V logits as a [BLOCK_V // LANES_V, LANES_V] tile and folds it into a LANES_V-wide state
# (``row_softmax_stats``). Measured on an H100 at N=8192, V=151936, bf16 with LANES_V = BLOCK_V
# (benchmarks/tune_triton.py; logs in benchmarks/results/nvidia-h100-80gb-hbm3/logs/): block-max logprobs forward
# 2048x4 91% of the copy bandwidth, 4096x4 89%, 1024x4 86%, 4096x8 80%; the two-row KL forward (old per-lane
# state; block-max now, unmeasured) 1024x8, 512x4 71%, 2048x4 53%.
# On an H200 (4.3 TB/s) the best of those reached only 64-75% for the logprobs and PPO forwards, while
# Liger-Kernel's GRPO forward, one warp per row with 2048-wide blocks, ran at 98.6%
# (benchmarks/results/nvidia-h200/NOTES.md). A bandwidth-bound loop needs bytes in flight, and with a state as
# wide as the block each in-flight value also holds its two float32 sums: sm_90 builds of the bf16 logprobs
# forward (tests/triton/aot_compile_kernels.py) take 64 registers at 2048x4, 255 at 2048x1 and spill at 4096x1,
# so every such config keeps about 32 KB of loads in flight per SM. The tiled candidates keep 8 lanes of state per
# thread (LANES_V = 256 per warp) and fold 32-128 values per thread and iteration: 64-168 registers, no spills,
# 2-3x the bytes in flight (1-warp programs also run their loop without a barrier), and 10.1-11.1 sm_90 SASS
# instructions per bf16 value in the loop against 13.4-15.4 (the rescale is paid per lane, not per value). At the
# H200's bandwidth a read-only sweep has ~15 issue slots per value (132 SMs, 1.98 GHz, 2.1e12 values/s). Unmeasured
# on a GPU until the next run; the autotuner keeps whichever is fastest.
_WIDE_STATE_CANDIDATES = (
    (4096, 4096, 4), (2048, 2048, 4), (2048, 2048, 8), (1024, 1024, 4), (1024, 1024, 8), (512, 512, 4),
    (256, 256, 4), (128, 128, 4),
)
_ROW_FWD_CANDIDATES = _WIDE_STATE_CANDIDATES + (
    (1024, 256, 1), (2048, 256, 1), (4096, 256, 1), (4096, 512, 2), (4096, 1024, 4), (8192, 1024, 4),
)
# The KL forward reads two rows: half the tile for the same registers (its 4096 x 256 x 1 build spills).
_TWO_ROW_FWD_CANDIDATES = _WIDE_STATE_CANDIDATES + (
    (512, 256, 1), (1024, 256, 1), (2048, 256, 1), (2048, 512, 2), (2048, 1024, 4), (4096, 2048, 8),
)


# Rows shorter than this skip the tiled candidates: those pay off for long vocabularies (Liger's case was
# V = 151936), and each candidate is one more compile on a key's first call.
_TILED_MIN_V = 32768

# Off the autotuner (the interpreter, RLHF_KERNELS_TRITON_BLOCK_V): LANES_V = BLOCK_V // 4, so that the CPU
# tests fold several tile rows per iteration, and partial tiles at the end of a row.
_UNTUNED_TILE_ROWS = 4


def _prune_row_configs(configs, named_args, **kwargs):
    """Keep blocks no wider than the row (and, for long rows, no narrower than 512); the tiled candidates
    (``LANES_V < BLOCK_V``) only for rows of at least ``_TILED_MIN_V``."""
    v = int(named_args["V"])
    cap = max(128, next_pow2(v))
    floor = min(cap, 512)
    return [c for c in configs if floor <= c.kwargs["BLOCK_V"] <= cap
            and (c.kwargs["LANES_V"] == c.kwargs["BLOCK_V"] or v >= _TILED_MIN_V)]


class _LazyAutotune:
    """``triton.autotune(...)(kernel)``, built on first use (``tuned[grid]``, or any attribute such as
    ``best_config``).

    Triton 3.2's ``Autotuner`` looks up the active GPU driver when it is built
    (and its ``autotune`` drops a ``do_bench`` that would avoid it), so building it
    at import raised ``0 active drivers`` on a machine without a GPU: importing
    ``rlhf_kernels.triton`` failed under the interpreter and in a CPU-only install.
    The tuned kernel is only launched on a GPU (``launch_row_kernel``), so it is
    built there.
    """

    def __init__(self, kernel, configs):
        self._kernel, self._configs, self._tuned = kernel, configs, None

    def _built(self):
        if self._tuned is None:
            self._tuned = triton.autotune(configs=self._configs, key=["V"],
                                          prune_configs_by={"early_config_prune": _prune_row_configs})(self._kernel)
        return self._tuned

    def __getitem__(self, grid):
        return self._built()[grid]

    def __getattr__(self, name):
        if name.startswith("_"):  # this object's own fields, before __init__ has set them (copy, pickle)
            raise AttributeError(name)
        return getattr(self._built(), name)


def row_autotune(kernel, candidates=_ROW_FWD_CANDIDATES):
    """``kernel`` autotuned over ``candidates`` (``(BLOCK_V, LANES_V, num_warps)``), keyed on ``V`` (and the
    tensors' dtypes); the autotuner is built at its first launch (``_LazyAutotune``)."""
    configs = [triton.Config({"BLOCK_V": block, "LANES_V": lanes}, num_warps=warps) for block, lanes, warps in candidates]
    return _LazyAutotune(kernel, configs)


def launch_row_kernel(kernel, tuned, grid, *args, vocab: int, device: torch.device, **constexprs) -> None:
    """Launch a forward row reduction: ``tuned`` on a GPU, else ``kernel`` with :func:`vocab_config`'s block."""
    if device.type == "cuda" and block_v_override() is None:
        tuned[grid](*args, **constexprs)
        return
    block, warps = vocab_config(vocab, device, "fwd")
    lanes = max(min(block, 16), block // _UNTUNED_TILE_ROWS)
    kernel[grid](*args, BLOCK_V=block, LANES_V=lanes, num_warps=warps, **constexprs)


# ---------------------------------------------------------------- rows whose length or stride is not a multiple of 16

# Triton issues 16-byte loads and stores only where it can prove a block's addresses 16-byte aligned, and it learns
# a row's alignment from integer arguments divisible by 16 (its launch specialisation). At GPT-2's V = 50257 (an odd
# row stride, or an odd length with the fused-linear ops' padded rows) it could not: the backward kernels moved
# every value with a 2-byte access (sm_90 PTX of the backwards: 16 ld.global.b16 and 16 st.global.b16 per thread
# and block, against 2 ld / st.global.v4 at V = 151936), and the H200 ran the Triton logprobs step at 4096 x 50257
# at 37% of the copy bandwidth against 76% at 151936 (benchmarks/results/nvidia-h200). With ``ALIGNED_BODY`` a
# kernel walks each row in blocks that start at the 16-byte boundary at or before it (``aligned_blocks``): the whole
# ones unmasked, their offsets asserted multiples of 16 bytes (16-byte accesses), the first (the row's head) and the
# last (its tail) contiguous under a mask. The backwards compute the same values column by column, the forwards'
# row sums (``row_softmax_stats``, the KL's two rows) the same sums grouped otherwise.
# tests/triton/aot_compile_kernels.py checks the 16-byte accesses in each kernel's PTX.


def body_aligned(rows: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a kernel may take ``ALIGNED_BODY`` for ``rows[B, T, V]`` and the ``others`` it reads or writes
    alongside (the gradient, the reference rows): every base address 16-byte aligned, the same element size,
    and row strides equal modulo a 16-byte vector, so one column offset is 16-byte aligned in all of them at once;
    and only where Triton's own specialisation would not already prove it (``V`` or a row stride not a multiple
    of 16 elements)."""
    size = rows.element_size()
    vec = 16 // size
    tensors = (rows,) + others
    if vec < 2 or any(t.element_size() != size or t.data_ptr() % 16 for t in tensors):
        return False
    if any(t.stride(i) % vec != rows.stride(i) % vec for t in others for i in (0, 1)):
        return False
    return rows.shape[-1] % 16 != 0 or any(t.stride(i) % 16 for t in tensors for i in (0, 1))


def body_walk(rows: torch.Tensor, *others: torch.Tensor) -> dict:
    """The ``ALIGNED_BODY`` and ``VEC`` (values per 16 bytes) constexprs of a launch over ``rows`` and ``others``
    (``body_aligned``)."""
    return {"ALIGNED_BODY": body_aligned(rows, *others), "VEC": 16 // rows.element_size()}


def column_blocks(vocab: int, block: int, walk: dict) -> int:
    """Programs per row of a backward's 2-D grid launched with ``walk`` (``body_walk``): ``cdiv(V, block)``, one
    more of reach with ``ALIGNED_BODY`` (its blocks start up to a vector before the row: ``aligned_blocks``; a row
    that needs fewer masks the rest off)."""
    return triton.cdiv(vocab + (walk["VEC"] - 1 if walk["ALIGNED_BODY"] else 0), block)


@triton.jit
def aligned_blocks(row_off, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    """``(shift, base, end, whole_end)`` of a row starting ``row_off`` elements past a 16-byte aligned base pointer:
    its columns sit at ``[shift, end)`` past ``base = row_off - shift``, a multiple of ``VEC`` (the values per 16
    bytes), ``end = shift + V``. Of the ``BLOCK_V`` blocks from ``base``, ``1 .. whole_end - 1`` lie wholly inside
    the row (unmasked, 16-byte accesses); block 0 (the row's head) and those from ``max(whole_end, 1)`` up to
    ``cdiv(end, BLOCK_V)`` (its tail) take a mask. ``shift`` and ``end`` are 32-bit, so a masked block's column
    tensors stay 32-bit."""
    shift = (row_off % VEC).to(tl.int32)
    end = shift + V
    return shift, row_off - shift, end, end // BLOCK_V


@triton.jit
def block_columns(j, row_off, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ALIGNED_BODY: tl.constexpr):
    """``(whole, c0, cols, mask)`` of a backward's block ``j`` along a row: columns ``cols = c0 + arange(BLOCK_V)``,
    ``mask`` those inside the row; ``whole`` (``ALIGNED_BODY`` only, else the constant False): all of them inside it
    and ``row_off + c0`` a multiple of ``VEC`` (``aligned_blocks``)."""
    if ALIGNED_BODY:
        shift, _, end, whole_end = aligned_blocks(row_off, V, BLOCK_V, VEC)
        c0 = j * BLOCK_V - shift
        whole = (j >= 1) & (j < whole_end)
    else:
        c0 = j * BLOCK_V
        whole = False
    cols = c0 + tl.arange(0, BLOCK_V)
    return whole, c0, cols, (cols >= 0) & (cols < V)


@triton.jit
def load_cols(ptr, offs, mask, WHOLE: tl.constexpr):
    """``ptr[offs]`` as float32; ``WHOLE``: every column is in the row (``mask`` unused: no mask, so 16-byte
    loads where aligned), else the masked-off ones read ``-inf``."""
    if WHOLE:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=float("-inf"))
    return x.to(tl.float32)


@triton.jit
def store_cols(ptr, offs, value, mask, WHOLE: tl.constexpr):
    """``ptr[offs] = value`` in ``ptr``'s dtype, under ``mask`` unless ``WHOLE``."""
    if WHOLE:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


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
def row_tile(LANES_V: tl.constexpr, BLOCK_V: tl.constexpr):
    """Column offsets ``[BLOCK_V // LANES_V, LANES_V]`` of one loop iteration's contiguous ``BLOCK_V`` logits.

    Consecutive lanes hold consecutive columns (coalesced, vectorised loads) and
    each tile row continues where the previous one ends, so a reduction over
    axis 0 folds a lane's own values: in registers when ``LANES_V`` is the
    program's width (8 columns per thread and ``256·num_warps`` lanes for bf16).
    """
    return tl.arange(0, BLOCK_V // LANES_V)[:, None] * LANES_V + tl.arange(0, LANES_V)[None, :]


@triton.jit
def tile_max(x):
    """The maximum of a 2-D :func:`row_tile` (NaN-propagating as ``tl.max``): over the rows first, in each
    thread's registers, then one cross-lane reduction (the other order shuffles once per tile row)."""
    return tl.max(tl.max(x, 0), 0)


@triton.jit
def row_softmax_stats(x_ptr, row_off, V, scale2, BLOCK_V: tl.constexpr, LANES_V: tl.constexpr,
                      ALIGNED_BODY: tl.constexpr = False, VEC: tl.constexpr = 8):
    """One read of a row of ``V`` logits at ``x_ptr + row_off``: ``(mx, S, T2)``, ``scale2 = log2(e) / temperature``.

    ``mx = max x`` (raw logits), and in log2 units ``d = (x - mx)·scale2``:
    ``S = Σ 2^d = Σ exp(z - max z)`` and ``T2 = Σ 2^d·d``. A *block-max* state:
    the running max is one scalar for the whole program, raised once per block by
    the block's max, while each of ``LANES_V`` lanes keeps its own ``s`` and
    ``t``. An iteration loads ``BLOCK_V`` logits as a :func:`row_tile`, so each
    lane adds ``BLOCK_V // LANES_V`` values, then rescales its state once:

        m' = max(m, max tile),  α = 2^((m - m')·scale2),  δ = (m - m')·scale2
        t  <- α·(t + s·δ) + Σ_rows 2^d·d,   s <- α·s + Σ_rows 2^d

    Per value that is a subtract, a multiply, a NaN-propagating max, one exp2 and
    two adds/FMAs, plus the rescale's share. With ``LANES_V = BLOCK_V`` (one
    value per lane and iteration) this ran on an H100 (bf16, V = 151936) at about
    90% of the copy bandwidth against 84% for a per-lane max, whose selects made
    the loop instruction-bound; a narrower state leaves registers for more loads
    in flight (``_ROW_FWD_CANDIDATES``). The lanes are summed once at the end
    (they share the max). ``x - mx`` is exact for bf16/fp16 logits, so large
    logits (|z| ~ 1e5) lose nothing to the scaling. ``d`` is floored at -256 so
    that an underflowed term adds exactly 0 to ``t`` (no 0·(-inf)); NaN passes the
    floor and makes the row's sums NaN.

    ``ALIGNED_BODY`` (``body_aligned``): blocks start at the 16-byte boundary at
    or before the row (``aligned_blocks``), the whole ones read unmasked with
    their offsets asserted multiples of ``VEC`` (16-byte loads), the first and
    the last under a mask; the same sums, grouped otherwise.
    """
    m = tl.max(tl.full([LANES_V], float("-inf"), tl.float32), 0)
    s = tl.zeros([LANES_V], tl.float32)
    t = tl.zeros([LANES_V], tl.float32)
    tile = row_tile(LANES_V, BLOCK_V)
    if ALIGNED_BODY:
        shift, base, end, whole_end = aligned_blocks(row_off, V, BLOCK_V, VEC)
        x = tl.load(x_ptr + base + tile, mask=(tile >= shift) & (tile < end), other=float("-inf")).to(tl.float32)
        m, s, t = _fold_tile(x, m, s, t, scale2)  # block 0: the head
        for i in range(1, whole_end):
            x = tl.load(x_ptr + tl.multiple_of(base + i * BLOCK_V, VEC) + tile).to(tl.float32)
            m, s, t = _fold_tile(x, m, s, t, scale2)
        for i in range(tl.maximum(whole_end, 1), tl.cdiv(end, BLOCK_V)):  # the tail
            rel = i * BLOCK_V + tile
            x = tl.load(x_ptr + base + rel, mask=rel < end, other=float("-inf")).to(tl.float32)
            m, s, t = _fold_tile(x, m, s, t, scale2)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + tile
            x = tl.load(x_ptr + row_off + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m, s, t = _fold_tile(x, m, s, t, scale2)
    return m, tl.sum(s, 0), tl.sum(t, 0)


@triton.jit
def _fold_tile(x, m, s, t, scale2):
    """One :func:`row_tile` of logits folded into the block-max state ``(m, s, t)`` (:func:`row_softmax_stats`)."""
    m_new = tl.maximum(m, tile_max(x))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: sums stay 0
    alpha = tl.exp2((m - m_use) * scale2)
    dm = tl.where(m == float("-inf"), 0.0, (m - m_use) * scale2)
    d = tl.maximum((x - m_use) * scale2, -256.0, propagate_nan=tl.PropagateNan.ALL)
    e = tl.exp2(d)
    t = alpha * (t + s * dm) + tl.sum(e * d, 0)
    s = s * alpha + tl.sum(e, 0)
    return m_new, s, t


@triton.jit
def row_logp_entropy_lse(x_ptr, row_off, y, V, inv_t, BLOCK_V: tl.constexpr, LANES_V: tl.constexpr,
                         ALIGNED_BODY: tl.constexpr = False, VEC: tl.constexpr = 8):
    """``(logp, entropy, lse)`` of the row at ``x_ptr + row_off`` at target ``y`` under ``softmax(x·inv_t)``, one
    read of the row.

    With ``(mx, S, T2)`` of :func:`row_softmax_stats`: ``lse = mx·inv_t + ln S``
    (``mx·inv_t`` rounds exactly as the backward's ``z = x·inv_t`` does at the
    max), ``H = ln2·(log2 S - T2 / S)``, ``logp = (x[y] - mx)·inv_t - ln S``. An
    out-of-range ``y`` is never read and gives a NaN ``logp``.
    """
    mx, S, T2 = row_softmax_stats(x_ptr, row_off, V, inv_t * 1.4426950408889634, BLOCK_V, LANES_V, ALIGNED_BODY,
                                  VEC)
    ln2 = 0.6931471805599453
    log2_s = tl.log2(S)
    in_range = (y >= 0) & (y < V)
    xy = tl.load(x_ptr + row_off + tl.where(in_range, y, 0), mask=in_range, other=0.0).to(tl.float32)
    logp = tl.where(in_range, (xy - mx) * inv_t - log2_s * ln2, float("nan"))
    return logp, (log2_s - T2 / S) * ln2, mx * inv_t + log2_s * ln2


@triton.jit
def expm1_series(d):
    """``(expm1(d) - d) / d²`` by its Taylor series to d^12: used for |d| < 0.5, where ``exp(d) - 1 - d`` cancels."""
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
    return p * d + 0.5


@triton.jit
def expm1_minus_x(d):
    """``exp(d) - 1 - d`` without cancellation near 0."""
    return tl.where(tl.abs(d) < 0.5, expm1_series(d) * d * d, tl.exp(d) - 1.0 - d)


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
        g = tl.zeros_like(d) + 1.0  # not d·0 + 1: an infinite d (a target of probability 0) would make it NaN
    elif KL_EST == 2:
        g = -d
    else:
        # -expm1(d), taken as 1 - exp(d) away from 0 rather than -(d + expm1_minus_x(d)): that sum is -inf + inf
        # where the reference's log-prob is -inf (d = -inf), whose limit 1 the oracle's autograd gives
        g = tl.where(tl.abs(d) < 0.5, -(d + expm1_series(d) * d * d), 1.0 - tl.exp(d))
    return g


KL_EST_CODES = {"k1": 1, "k2": 2, "k3": 3}
