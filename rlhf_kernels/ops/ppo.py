"""``ppo_loss``: the PPO clipped policy loss straight from logits.

Triton backend: one fused kernel (``rlhf_kernels::ppo_term_fwd``) goes from
logits to the per-token PPO term (log-prob, entropy, ratio, clips, KL
estimator, entropy bonus) in one read of the vocabulary. When ``logits``
requires grad, the forward also writes the gradient, as the CUDA backend's
(below): ``rlhf_kernels::ppo_loss_fused`` computes the per-token weights
``w`` of ``loss = Σ w·term`` (one-program kernels before and after, ``triton/aggregate.py``,
as CUDA's), and one kernel per row (``triton.ppo.ppo_fused_fwd``)
sweeps the row for its statistics, then sweeps it again writing
``dlogits = w·∂term/∂logits``; the backward only scales it by the upstream gradient. Three launches
where the two-pass form (forward kernel; PyTorch's aggregation and its backward; a backward kernel)
took 32, whose host time bound the Triton step on an H200 at
4096 x 50257 (2.05 ms for 0.70 ms of kernels, run 6). ``RLHF_KERNELS_TRITON_PPO=two-pass``
keeps the two-pass form, which ``overwrite_logits=True`` also takes (the autotuner runs a kernel more
than once, so the fused one cannot write over the logits it reads): ``ppo_term_fwd``, then
``rlhf_kernels::ppo_term_bwd`` computing the per-token derivative in-kernel from the ``[B, T]``
gradient of the ``loss_agg`` reduction, which stays in PyTorch.
Other backends compose the fused ``logprobs`` op (C++ CPU kernel or reference)
with the per-token arithmetic in PyTorch.

CUDA backend (``csrc/cuda/ppo.cu``): without a gradient, the same one-read
forward kernel, with the loss and the logged means from the aggregation kernels
below in the same C++ call (``ppo_loss_fused(..., with_grad=False)``; through the
per-token op and PyTorch's aggregation the call had been host-bound on the H200,
0.80 ms at bf16 4096 x 50257 against Liger-Kernel's 0.30). When ``logits``
requires grad, the forward also produces the gradient (``rlhf_kernels::ppo_loss_fused``):
``loss_agg`` is linear in the per-token term, ``loss = Σ w·term`` with weights ``w`` that depend on the mask
alone (``aggregation_weights``), so the kernel writes ``dlogits = w·∂term/∂logits``
as soon as a row's statistics are known and the backward only multiplies by the
scalar upstream gradient (a no-op, with no memory traffic, when it is 1, as in
``loss.backward()``). The weights, the loss and the logged means come from two
one-CTA kernels launched by the same C++ call (``rlhf_kernels_C::ppo_fwd_loss``,
``csrc/cuda/ppo_aggregate.cuh``) instead of 13-30 small PyTorch kernels, each a
Python call: at micro-batch sizes the step is bound by the host. Where the row
waits between the kernel's two sweeps is chosen per call (``RLHF_KERNELS_CUDA_PPO``,
default ``auto``):

- ``shared``: the whole row in one CTA's shared memory, when it fits (bf16 rows up
  to ~56K entries on H100/H200, ~40K on A100);
- ``cluster`` (sm_90): the row split over a 2-8 CTA thread-block cluster, each
  slice in its CTA's shared memory, the softmax statistics exchanged through
  distributed shared memory; logits read once, dlogits written once (bf16 Qwen
  V = 151936 uses 4 CTAs);
- ``global``: the second sweep re-reads the row (any GPU / V, e.g. sm_80 with a
  row over ~80 KB): two reads and one write, like the two-pass form;
- ``l2`` (opt-in; measured slower, 2.51 ms at best against ``cluster``'s 1.81 on an H200,
  bf16 8192 x 151936, ``benchmarks/results/nvidia-h200/logs/run5/tune_cuda.log``): ``global`` with 1-4 CTAs of 512 threads per
  SM (as many as have their rows fit in half of L2, at least one), and the second
  sweep walking each thread's columns backwards, so it starts with the lines read
  last: where the re-read hits L2, one read and one write reach memory, without a
  cluster;
- ``pipe`` (sm_90, opt-in; measured slower, 2.52 ms at best, same log): ``cluster``'s slices kept by a
  persistent kernel, one CTA per SM with two slice buffers, so each SM loads the
  next row's slice while it writes this row's gradient (``csrc/cuda/row_pipeline.cuh``):
  one read and one write, with reads and writes overlapped on every SM;
- ``two-pass``: no gradient in the forward: ``ppo_term_fwd`` then ``ppo_term_bwd``.

The ``shared`` and ``cluster`` paths fill their slice with ``cp.async``, 16 vectors in flight per thread
instead of 4, with the same results bit for bit (``csrc/cuda/row_prefetch.cuh``); ``RLHF_KERNELS_CUDA_PREFETCH=0``
keeps the register sweep. On an H200 (bf16 8192 x 151936, the cluster path) the prefetch was the faster at each
of the five CTA caps, 2.624 against 2.732 ms at the default 256
(``benchmarks/results/nvidia-h200/logs/run3/tune_cuda.log``). ``RLHF_KERNELS_CUDA_PREFETCH=bulk`` (sm_90, opt-in;
measured slower on an H200, 1.675 against 1.619 ms, ``logs/run6/bench_ppo_cluster+bulk.log``) has thread 0 copy
the whole slice in with the TMA's bulk copies, at most 8 per CTA, each landing behind its own mbarrier, so the
slice is in flight at once and the other threads only fold it (``csrc/cuda/row_bulk.cuh``; CTAs of at most 256
threads; the same bits).

``RLHF_KERNELS_CUDA_CLUSTER=2|4|8`` sets the smallest cluster the ``cluster`` path may use (default: the
smallest whose slices fit, 4 CTAs for a bf16 row of 151936).

``auto`` takes shared, else cluster, else global. ``rlhf_kernels._C.ppo_plan``
reports the choice for a ``(V, dtype)``; a forced path that cannot run there (``shared``
for a row larger than a CTA's shared memory, ``cluster`` / ``pipe`` before sm_90) raises
``ValueError`` naming the setting (``check_cuda_ppo_path_runs``). The fused path keeps ``dlogits``
(``[*, V]``, logits' dtype) alive from the forward to the backward, which hands
it to autograd as the gradient itself, not a copy (``ops/_forward_grads.py``),
so the backward runs once: ``retain_graph=True`` and a second backward raise.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .. import _ext, reference
from ..reference import PPOLossOutput
from . import _forward_grads as forward_grads
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    WHOLE,
    as_rows,
    base_and_range,
    check_choice,
    check_integer,
    check_logits,
    check_number,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    grad_for_range,
    rows_in_range,
    zero_outside,
)
from ._eager import eager_autograd, eager_call, needs_the_op
from .logprobs import IMPLEMENTED as _LOGPROBS_IMPLEMENTED
from .logprobs import (
    TargetCheck,
    _torch_bwd,
    _torch_fwd,
    backward_grad,
    grad_like,
    grad_over,
    logprobs_for,
    overwritable,
    range_lead,
    resolve_for,
)

__all__ = ["PPOLossOutput", "check_ppo_args", "composed_ppo_terms", "ppo_loss", "ppo_output"]

# Triton and CUDA run fused kernels; the others compose ``logprobs`` with PyTorch arithmetic.
IMPLEMENTED = tuple(dict.fromkeys(("triton", "cuda") + tuple(_LOGPROBS_IMPLEMENTED)))

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
# loss_agg as ppo_fwd_loss takes it (csrc/cuda/launchers.h: LossAgg)
_LOSS_AGG_CODES = {mode: code for code, mode in enumerate(reference.LOSS_AGG_MODES)}
# RLHF_KERNELS_CUDA_PPO: how the cuda backend of ppo_loss produces dlogits (see the module docstring).
CUDA_PPO_PATHS = {"auto": 0, "global": 1, "shared": 2, "cluster": 3, "l2": 5, "pipe": 6, "two-pass": -1}


def cuda_ppo_path() -> str:
    """The ``RLHF_KERNELS_CUDA_PPO`` setting (``auto`` when unset)."""
    value = os.environ.get("RLHF_KERNELS_CUDA_PPO", "auto").strip().lower() or "auto"
    if value not in CUDA_PPO_PATHS:
        raise ValueError(f"RLHF_KERNELS_CUDA_PPO must be one of {tuple(CUDA_PPO_PATHS)}, got {value!r}")
    return value


TRITON_PPO_PATHS = ("fused", "two-pass")


def triton_ppo_path() -> str:
    """The ``RLHF_KERNELS_TRITON_PPO`` setting (``fused`` when unset): how the triton backend of ``ppo_loss`` produces
    ``dlogits`` when the logits require grad (the module docstring)."""
    value = os.environ.get("RLHF_KERNELS_TRITON_PPO", "fused").strip().lower() or "fused"
    if value not in TRITON_PPO_PATHS:
        raise ValueError(f"RLHF_KERNELS_TRITON_PPO must be one of {TRITON_PPO_PATHS}, got {value!r}")
    return value


CUDA_PREFETCH_MODES = ("1", "0", "bulk")


def cuda_ppo_prefetch() -> str:
    """The ``RLHF_KERNELS_CUDA_PREFETCH`` setting, how the fused path fills its shared-memory slice: ``1`` or unset
    (the default) with cp.async (``csrc/cuda/row_prefetch.cuh``), ``0`` with the register sweep, ``bulk`` with the
    TMA's bulk copies (``csrc/cuda/row_bulk.cuh``; sm_90, cp.async elsewhere); bit-identical results. The kernel
    launcher reads the variable itself; anything else is rejected here, by name, before a launch."""
    value = os.environ.get("RLHF_KERNELS_CUDA_PREFETCH", "") or "1"
    if value not in CUDA_PREFETCH_MODES:
        raise ValueError(f"RLHF_KERNELS_CUDA_PREFETCH must be one of {CUDA_PREFETCH_MODES}, got {value!r}")
    return value


CUDA_CLUSTER_SIZES = (2, 4, 8)


def cuda_ppo_cluster() -> Optional[int]:
    """The ``RLHF_KERNELS_CUDA_CLUSTER`` setting: the smallest thread-block cluster (2, 4 or 8 CTAs) the fused
    path's ``cluster`` layout may split a row over, or ``None`` when unset (the smallest whose slices fit in
    shared memory; ``min_cluster_size`` in ``csrc/cuda/row_common.cuh``). A larger cluster leaves each CTA a
    smaller slice, so more CTAs share an SM. The launcher reads the variable itself; anything else is rejected
    here, by name, before a launch."""
    value = os.environ.get("RLHF_KERNELS_CUDA_CLUSTER", "")
    if value == "":
        return None
    if value not in {str(size) for size in CUDA_CLUSTER_SIZES}:
        raise ValueError(f"RLHF_KERNELS_CUDA_CLUSTER must be one of {CUDA_CLUSTER_SIZES}, got {value!r}")
    return int(value)


@functools.lru_cache(maxsize=64)
def _cuda_ppo_plan_name(device_index: int, vocab: int, dtype_name: str, code: int, cluster: Optional[int]) -> str:
    # ``cluster`` (RLHF_KERNELS_CUDA_CLUSTER) is only part of the key: the plan reads the variable itself
    return _ext.load().ppo_plan(vocab, dtype_name, code, True, device_index)[0]


def check_cuda_ppo_path_runs(path: str, logits: torch.Tensor, cluster: Optional[int]) -> None:
    """Refuse a forced ``RLHF_KERNELS_CUDA_PPO`` path that cannot run for ``logits``' vocabulary and dtype on its
    GPU (``shared`` when a row does not fit one CTA's shared memory, ``cluster`` / ``pipe`` without sm_90
    clusters): ``ValueError`` naming the setting, before any kernel. ``auto`` and ``two-pass`` always run.
    ``path`` and ``cluster``: the caller's ``cuda_ppo_path()`` and ``cuda_ppo_cluster()``. The answer is cached
    per (device, V, dtype, path, cluster setting), so a training loop asks the GPU once.

    Why here and not only in the binding: the binding's own refusal (a C++ ``TORCH_CHECK``) ended an H200
    process with SIGSEGV instead of raising (run 5, ``benchmarks/results/nvidia-h200/logs/run5/shared_crash.log``).
    """
    if path in ("auto", "two-pass"):
        return
    index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    dtype_name = str(logits.dtype).replace("torch.", "")
    vocab = int(logits.shape[-1])
    if _cuda_ppo_plan_name(index, vocab, dtype_name, CUDA_PPO_PATHS[path], cluster) == "none":
        why = "a row does not fit in one CTA's shared memory" if path == "shared" else (
            "it needs sm_90 thread-block clusters whose slices fit in shared memory")
        raise ValueError(f"RLHF_KERNELS_CUDA_PPO={path} cannot run for V = {vocab} in {dtype_name} on this GPU "
                         f"({why}); unset it (auto) or choose global")


def aggregation_weights(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """``w = ∂ aggregate_loss(term, mask, loss_agg) / ∂term``, float32, shaped like ``mask``.

    Every ``loss_agg`` is linear in ``term``, so ``aggregate_loss(term) = Σ w·term``:

    - ``token-mean``: ``w = m / Σ m``
    - ``seq-mean-token-mean``: ``w = m / (Σ_t m · number of non-empty sequences)`` (row-wise ``Σ_t``)
    - ``seq-mean-token-sum``: ``w = m / num_seqs``
    - ``seq-mean-token-sum-norm``: ``w = m / (num_seqs · T)``

    with 0 where a denominator is 0 (empty masks give a 0 loss and 0 gradients).
    """
    m = mask.to(torch.float32)
    if loss_agg == "token-mean":
        return _divide_or_zero(m, m.sum())
    num_seqs = m.numel() // m.shape[-1] if m.numel() else 0
    if loss_agg == "seq-mean-token-sum":
        return m / num_seqs if num_seqs else m
    if loss_agg == "seq-mean-token-sum-norm":
        return m / (num_seqs * m.shape[-1]) if num_seqs else m
    seq_len = m.sum(-1, keepdim=True)
    non_empty = (seq_len > 0).to(torch.float32).sum()
    return _divide_or_zero(_divide_or_zero(m, seq_len), non_empty)


def _divide_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den == 0``: ``reference._safe_divide``'s values in three kernels instead of six (its
    two fills and second select keep a gradient finite, which constant weights never need; each launch is host
    time beside a micro-batch's kernel)."""
    return torch.where(den != 0, num / den, 0.0)


def check_ppo_args(
    lead,
    lead_from: str,
    device_name: str,
    device_tensor: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    *,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    loss_agg: str,
    ignore_index: int,
) -> None:
    """The checks shared by ``ppo_loss`` and ``linear_ppo_loss``: per-token inputs of shape ``lead``, the options, and
    a ``[B, T, *]`` ``device_tensor`` for the per-sequence ``loss_agg`` modes."""
    for name, value in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if value is not None or name != "ref_logp":
            check_tensor(name, value, FLOAT_DTYPES)
            check_same_shape(name, value, lead, lead_from)
    check_tensor("mask", mask)
    check_same_shape("mask", mask, lead, lead_from)
    check_same_device(device_name, device_tensor, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGG_MODES)
    # (clip_low < 1: the ratio's lower bound is 1 - clip_low)
    check_number("clip_low", clip_low, low=0.0, high=1.0, high_open=True)
    check_number("clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        check_number("dual_clip", dual_clip, low=1.0, low_open=True)
    check_number("kl_coef", kl_coef)
    check_number("entropy_coef", entropy_coef)
    check_integer("ignore_index", ignore_index)
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if loss_agg != "token-mean" and len(lead) < 2:
        last = {"logits": "V", "hidden": "H"}.get(device_name, "*")
        raise ValueError(f"loss_agg={loss_agg!r} needs {device_name} of shape [B, T, {last}], "
                         f"got {tuple(device_tensor.shape)}")


def composed_ppo_terms(logp, entropy, old_logp, advantages, ref_logp, mask, **options):
    """``reference.ppo_token_terms`` on detached per-token inputs cast to ``logp``'s dtype (the non-fused path);
    ``logp``'s gradient is 0 where ``mask == 0`` (``reference.without_gradient_where``)."""
    dtype = logp.dtype
    return reference.ppo_token_terms(
        reference.without_gradient_where(logp, mask),
        entropy,
        old_logp.detach().to(dtype),
        advantages.detach().to(dtype),
        ref_logp=None if ref_logp is None else ref_logp.detach().to(dtype),
        **options,
    )


def ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg: str,
               loss: Optional[torch.Tensor] = None, means: Optional[torch.Tensor] = None) -> PPOLossOutput:
    """Aggregate the per-token ``term`` (unless a fused op already did: ``loss``) and attach the detached
    statistics users log: ``clip_frac`` and ``approx_kl``, masked means as in ``reference.ppo_loss`` (unless a fused
    op already computed them: ``means``, ``[clip_frac, approx_kl]``).

    Written for few launches: on a GPU each small kernel here costs a few µs beside a main kernel of ~0.6 ms
    (bf16 8192 x 151936), and they were ~20% of the PPO forward's time on the H200. The mask's count and its
    zero test are shared by the three means, and the two statistics are one stacked reduction: about 17 kernels
    for token-mean, against 33 for ``reference.aggregate_loss`` plus two ``_safe_divide`` means. The same
    arithmetic: ``Σ m·x / Σ m``, 0 (with finite gradients) when ``Σ m == 0``.
    """
    if means is not None:  # (the fused op, which gives the loss too)
        clip_frac, approx_kl = means.detach().unbind()
        return PPOLossOutput(loss, logp.detach(), entropy.detach(), kl.detach(), clip_frac, approx_kl)
    maskf = mask.to(logp.dtype)
    count = maskf.sum()
    nonzero = count != 0
    den = torch.where(nonzero, count, 1.0)
    if loss is None:
        if loss_agg == "token-mean":
            masked_sum = reference.masked(term, maskf.to(term.dtype)).sum()
            loss = torch.where(nonzero, masked_sum / den.to(term.dtype), 0.0)
        else:
            loss = reference.aggregate_loss(term, mask, loss_agg)
    with torch.no_grad():
        per_token = torch.stack((clipped.to(logp.dtype), 0.5 * (logp - old_logp.to(logp.dtype)).square()))
        means = reference.masked(per_token, maskf).reshape(2, -1).sum(1) / den
        clip_frac, approx_kl = torch.where(nonzero, means, 0.0).unbind()
    return PPOLossOutput(loss, logp.detach(), entropy.detach(), kl.detach(), clip_frac, approx_kl)


def _torch_dterm_dlogp(logp, old_logp, advantages, ref_logp, kl_coef, kl_estimator, clip_low, clip_high, dual_clip):
    """``∂term/∂logp`` with PyTorch autograd's sub-gradient choices (the Triton kernel's formula)."""
    raw = logp - old_logp
    ratio = raw.clamp(-20.0, 20.0).exp()
    pg_u = -advantages * ratio
    pg_c = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = pg_c > pg_u
    dpg = torch.where(clipped, torch.zeros_like(logp), -advantages)
    if dual_clip is not None:
        pg = torch.maximum(pg_u, pg_c)
        pg_d = -advantages * dual_clip
        neg = advantages < 0
        dpg = torch.where(neg & (pg == pg_d), 0.5 * dpg, torch.where(neg & (pg_d < pg), torch.zeros_like(dpg), dpg))
    dpg = torch.where((raw >= -20.0) & (raw <= 20.0), dpg * ratio, torch.zeros_like(dpg))
    if ref_logp is None:
        return dpg, torch.zeros_like(dpg)
    d = ref_logp - logp
    dk = {"k1": torch.ones_like(d), "k2": -d, "k3": -torch.expm1(d)}[kl_estimator]
    return dpg + kl_coef * dk, dk


def weighted(weight: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """``weight·slope`` per token, exactly 0 where ``weight == 0``: a token outside the mask (or under a zero
    upstream gradient) gets a zero gradient row even where its term's slope is not finite (an infinite KL
    estimate, a NaN advantage in a padded position), where ``0·inf`` would be NaN and spread through the model's
    weights. The kernels' rule too (``csrc/cuda/ppo_term.cuh``, ``triton/ppo.py``);
    ``reference.without_gradient_where`` is the oracle's."""
    return torch.where(weight != 0, weight * slope, 0.0)


def _token_rows(shape2: torch.Size, *tensors: Optional[torch.Tensor]) -> list:
    """The per-token ``[*]`` inputs (``None`` kept) as the ``[B, T]`` rows of ``as_rows``' ``shape2``."""
    return [None if t is None else t.reshape(shape2) for t in tensors]


def _ppo_term_fwd(
    logits: torch.Tensor,
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
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO term from ``logits[*, V]``: ``(term, logp, entropy, kl, clipped, lse)``, each float32 ``[*]``.

    ``old_logp``, ``advantages`` (and ``ref_logp``) are float32 ``[*]``;
    ``clipped`` is 1.0 where a clip was active. Backends ``triton`` and ``cuda``
    (fused kernels) and ``torch`` (reference math). With ``row_count != WHOLE``
    the op computes on ``logits[:, row_start:row_start + row_count]`` of a
    ``[B, L, V]`` ``logits`` and its gradient is shaped like ``logits``
    (``logprobs_fwd``). ``overwrite`` (eager calls only): the backward writes the
    gradient over ``logits`` (``logprobs.grad_over``).
    """
    logits = rows_in_range(logits, row_start, row_count)
    lead = logits.shape[:-1]
    rows = as_rows(logits)
    shape2 = rows.shape[:2]
    flat = _token_rows(shape2, targets, old_logp, advantages, ref_logp)
    with TargetCheck(targets, logits.shape[-1], ignore_index, "ppo_loss"):  # read after the kernel is queued
        if backend == "triton":
            from ..triton.ppo import ppo_term_fwd as triton_fwd

            out = triton_fwd(rows, *flat, temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low,
                             clip_high, dual_clip)  # fmt: skip
        elif backend == "cuda":
            out = torch.ops.rlhf_kernels_C.ppo_fwd(
                rows, flat[0], flat[1], flat[2], flat[3], None, temperature, ignore_index, kl_coef,
                _KL_CODES[kl_estimator], entropy_coef, clip_low, clip_high, dual_clip, 0,
            )[:6]
        else:
            logp, entropy, lse = _torch_fwd(rows.float(), flat[0], temperature, ignore_index)
            term, kl, clipped = reference.ppo_token_terms(
                logp, entropy, flat[1], flat[2], ref_logp=flat[3], kl_coef=kl_coef, kl_estimator=kl_estimator,
                entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            )
            out = (term, logp, entropy, kl, clipped.float(), lse)
    return tuple(t.reshape(lead).contiguous() for t in out)


ppo_term_fwd = torch.library.custom_op("rlhf_kernels::ppo_term_fwd", mutates_args=())(_ppo_term_fwd)


@ppo_term_fwd.register_fake
def _(logits, targets, old_logp, advantages, ref_logp, temperature, ignore_index, kl_coef, kl_estimator,
      entropy_coef, clip_low, clip_high, dual_clip, backend, row_start=0, row_count=WHOLE, overwrite=False):
    return tuple(logits.new_empty(range_lead(logits, row_start, row_count), dtype=torch.float32) for _ in range(6))


def _ppo_term_bwd(
    grad_term: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    grad_kl: torch.Tensor,
    logits: torch.Tensor,
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
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` of ``Σ g_term·term + g_logp·logp + g_H·entropy + g_kl·kl``, in ``logits.dtype``.

    Shaped like ``logits``; with a row range the kernel writes the range's rows
    in place and the others are zero (``logprobs.grad_like``).
    """
    _, write = _term_backward_writer(grad_term, grad_logp, grad_entropy, grad_kl, logits, targets, logp, entropy, lse,
                                     old_logp, advantages, ref_logp, temperature, ignore_index, kl_coef, kl_estimator,
                                     entropy_coef, clip_low, clip_high, dual_clip, backend, row_start, row_count)
    return grad_like(logits, row_start, row_count, write)


ppo_term_bwd = torch.library.custom_op("rlhf_kernels::ppo_term_bwd", mutates_args=())(_ppo_term_bwd)
ppo_term_bwd_call = eager_call(ppo_term_bwd, _ppo_term_bwd)  # what the backward calls


def _term_backward_writer(grad_term, grad_logp, grad_entropy, grad_kl, logits, targets, logp, entropy, lse, old_logp,
                          advantages, ref_logp, temperature, ignore_index, kl_coef, kl_estimator, entropy_coef,
                          clip_low, clip_high, dual_clip, backend, row_start, row_count):
    """``(rows, write)`` of ``ppo_term_bwd``: the rows it computes on and ``write(out)``, which writes their gradient
    into ``out`` (``None``: a new tensor) and returns what it wrote (``grad_like`` / ``logprobs.grad_over``)."""
    rows = as_rows(rows_in_range(logits, row_start, row_count))
    shape2 = rows.shape[:2]
    per_token = [
        None if t is None else t.reshape(shape2).float()
        for t in (grad_term, grad_logp, grad_entropy, grad_kl, logp, entropy, lse, old_logp, advantages, ref_logp)
    ]
    g_term, g_logp, g_ent, g_kl, lp, ent, lse_, old, adv, ref = per_token
    flat_targets = targets.reshape(shape2)

    def write(out):
        if backend == "triton":
            from ..triton.ppo import ppo_term_bwd as triton_bwd

            return triton_bwd(
                g_term, g_logp, g_ent, g_kl, rows, flat_targets, lp, ent, lse_, old, adv, ref, temperature,
                ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, out,
            )
        dterm, dk = _torch_dterm_dlogp(lp, old, adv, ref, kl_coef, kl_estimator, clip_low, clip_high, dual_clip)
        total_logp = g_logp + weighted(g_term, dterm) + weighted(g_kl, dk)
        total_ent = g_ent - g_term * entropy_coef
        args = (total_logp, total_ent, rows, flat_targets.contiguous(), lse_, ent, temperature, ignore_index)
        if backend == "cuda":  # the per-token derivative above is [B, T]; the [B, T, V] sweep is the kernel's
            if out is None:
                return torch.ops.rlhf_kernels_C.logprobs_bwd(*args)
            torch.ops.rlhf_kernels_C.logprobs_bwd_out(*args, out)
            return out
        return _torch_bwd(*args)

    return rows, write


@ppo_term_bwd.register_fake
def _(grad_term, grad_logp, grad_entropy, grad_kl, logits, targets, logp, entropy, lse, old_logp, advantages,
      ref_logp, temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, backend,
      row_start=0, row_count=WHOLE):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


# ------------------------------------------------------------- forward that also produces the gradient


def overwrites_logits(base: torch.Tensor, rows: torch.Tensor, backend: str) -> bool:
    """Whether the fused forward can write its gradient over the logits (``ppo_loss(overwrite_logits=True)``).

    The CUDA kernel can on every path: each thread reads a column before it writes that column's gradient, and the
    target's column, rewritten last, from a copy taken before (``write_row_range`` in ``csrc/cuda/row_grad.cuh``).
    Not when the rows are a copy of ``base`` (``as_rows`` could not view them) or ``base`` is not contiguous (the
    backward's in-place scale takes a contiguous gradient). The ``torch`` backend (tests) copies its gradient over
    the rows.
    """
    return backend in ("cuda", "torch") and overwritable(base, rows)


def _ppo_loss_fused(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    mask: torch.Tensor,
    temperature: float,
    ignore_index: int,
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    loss_agg: str,
    path: int,
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
    overwrite: bool = False,
    with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """``(loss, term, logp, entropy, kl, clipped, dlogits, means)`` in one kernel.

    ``loss = aggregate_loss(term, mask, loss_agg)`` (a float32 scalar; the only
    differentiable output), per-token float32 ``[*]`` statistics, and
    ``dlogits = ∂loss/∂logits`` (``[*, V]``, logits' dtype) written by the forward
    kernel from the per-token weights ``aggregation_weights(mask, loss_agg)``, and
    ``means = [clip_frac, approx_kl]`` (token means over the mask, as ``ppo_output``'s).
    On ``cuda`` the weights, the loss and the means come from the same C++ call as
    the kernel (``rlhf_kernels_C::ppo_fwd_loss``); on ``triton`` from one-program kernels around
    the row kernel (``triton/aggregate.py``; ``triton.ppo.ppo_fused_fwd``: the forward's sweep, then the
    gradient's over the same row); on ``torch`` from PyTorch (``aggregation_weights``, ``_fused_loss_and_means``).
    ``path``: 0 auto, 1 global, 2 shared, 3 cluster (``csrc/cuda/ppo.cu``; the other backends ignore it).
    Backends: ``cuda``, ``triton`` (never ``overwrite``), and ``torch`` (the same contract in PyTorch: tests, CPU).
    With ``row_count != WHOLE``, ``logits`` is the ``[B, L, V]`` base of the rows
    ``logits[:, row_start:row_start + row_count]`` the loss is computed on, and
    ``dlogits`` is ``[B, L, V]``: the kernel writes the range's rows in place, the
    others are zero.

    ``overwrite`` (eager calls only; ``ppo_loss(overwrite_logits=True)``): ``dlogits`` is written over ``logits``
    where that is safe (``overwrites_logits``), and ``dlogits`` is then ``logits``' own storage (a new tensor
    object over it, ``logits.detach()``); ``logits``' version counter is bumped, so autograd refuses a backward
    that needed their old values. No gradient-sized buffer is allocated.

    ``with_grad=False`` (a call without autograd: reference / old-policy losses, evaluation): no ``dlogits``
    (an empty tensor in its place; on ``cuda`` the kernel's forward-only form, one read of the logits), the same
    loss, statistics and means from the same few launches.
    """
    base = logits
    logits = rows_in_range(logits, row_start, row_count)
    lead = logits.shape[:-1]
    rows = as_rows(logits)
    shape2 = rows.shape[:2]
    in_place = with_grad and overwrite and overwrites_logits(base, rows, backend)
    if in_place:  # the kernel writes the gradient over the rows it reads (grad_over then finishes base)
        full, inner = None, rows
    else:
        full, inner = (None, None) if row_count == WHOLE or not with_grad else grad_for_range(base, row_start,
                                                                                              row_count)
    with TargetCheck(targets, logits.shape[-1], ignore_index, "ppo_loss"):  # read after the kernel is queued
        if backend == "cuda":  # the weights, the kernel, the loss and the means: one call, three launches
            term, logp, entropy, kl, clipped, _, grad, loss, means = torch.ops.rlhf_kernels_C.ppo_fwd_loss.default(
                rows, targets, old_logp, advantages, ref_logp, mask, _LOSS_AGG_CODES[loss_agg], temperature,
                ignore_index, kl_coef, _KL_CODES[kl_estimator], entropy_coef, clip_low, clip_high, dual_clip, path,
                inner, with_grad,
            )
            grad = inner if inner is not None else grad
        elif backend == "triton":  # the weights, the kernel, the loss and the means: three launches
            from ..triton.aggregate import loss_sums, loss_weights
            from ..triton.ppo import ppo_fused_fwd, ppo_term_fwd

            flat = _token_rows(shape2, targets, old_logp, advantages, ref_logp)
            mask2 = mask.reshape(shape2)
            weights, total = loss_weights(mask2, loss_agg)
            scalars = (temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip)
            if with_grad:
                term, logp, entropy, kl, clipped, _, grad = ppo_fused_fwd(rows, *flat, weights, *scalars, out=inner)
            else:  # the forward kernel: one read of the logits
                term, logp, entropy, kl, clipped, _ = ppo_term_fwd(rows, *flat, *scalars)
                grad = rows.new_empty((0,))
            loss, means = loss_sums(weights, mask2, total, term, clipped, logp, flat[1])
        else:
            flat = _token_rows(shape2, targets, old_logp, advantages, ref_logp)
            weights = aggregation_weights(mask, loss_agg).reshape(shape2)
            logp, entropy, lse = _torch_fwd(rows.float(), flat[0], temperature, ignore_index)
            term, kl, clipped = reference.ppo_token_terms(
                logp, entropy, flat[1], flat[2], ref_logp=flat[3], kl_coef=kl_coef, kl_estimator=kl_estimator,
                entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
            )
            clipped = clipped.float()
            dterm, _ = _torch_dterm_dlogp(logp, flat[1], flat[2], flat[3], kl_coef, kl_estimator, clip_low,
                                          clip_high, dual_clip)
            grad = (_torch_bwd(weighted(weights, dterm), -weights * entropy_coef, rows, flat[0].contiguous(), lse,
                               entropy, temperature, ignore_index) if with_grad else rows.new_empty((0,)))
            loss, means = _fused_loss_and_means(term, clipped, logp, flat[1], weights, mask.reshape(shape2),
                                                loss_agg)
    # the kernel's [B, T] statistics are already shaped like the tokens unless their leading shape is not [B, T]
    stats = (term, logp, entropy, kl, clipped)
    if stats[0].shape != lead:
        stats = tuple(t.reshape(lead).contiguous() for t in stats)
    if not with_grad:
        return (loss,) + stats + (grad, means)
    if in_place:  # (the reference's [B, T, V] gradient copied over the rows, the rest of base zeroed)
        return (loss,) + stats + (grad_over(base, rows, row_start, row_count, lambda _rows: grad), means)
    if full is None:
        return (loss,) + stats + (grad.reshape(logits.shape), means)
    if grad is not inner:  # the reference computed [B, T, V]: copy its rows
        inner.copy_(grad.reshape(inner.shape))
    return (loss,) + stats + (zero_outside(full, row_start, row_count), means)


def _fused_loss_and_means(term, clipped, logp, old_logp, weights, mask, loss_agg: str):
    """``(loss, [clip_frac, approx_kl])`` of the fused op's ``torch`` branch from its per-token ``[B, T]`` values:
    what ``ppo_fwd_loss``'s sums kernel computes on the GPU (``csrc/cuda/ppo_aggregate.cuh``).

    ``loss_agg`` is linear in the term, so ``loss = Σ w·term`` with the weights dlogits was scaled by (the value of
    ``reference.aggregate_loss`` up to rounding). The means are token means over the mask whatever ``loss_agg`` is,
    ``Σ m·x / Σ m`` (0 where ``Σ m = 0``): with ``token-mean`` those are the loss's own weights.
    """
    token_weights = weights if loss_agg == "token-mean" else aggregation_weights(mask, "token-mean")
    d = logp - old_logp
    # a weight is 0 exactly where the mask is (or the whole mask is empty): such tokens add nothing, even non-finite
    means = reference.masked(torch.stack((clipped, d * (0.5 * d))), token_weights).sum((1, 2))
    return reference.masked(term, weights).sum(), means


ppo_loss_fused = torch.library.custom_op("rlhf_kernels::ppo_loss_fused", mutates_args=())(_ppo_loss_fused)


@ppo_loss_fused.register_fake
def _(logits, targets, old_logp, advantages, ref_logp, mask, temperature, ignore_index, kl_coef, kl_estimator,
      entropy_coef, clip_low, clip_high, dual_clip, loss_agg, path, backend, row_start=0, row_count=WHOLE,
      overwrite=False, with_grad=True):
    per_token = tuple(logits.new_empty(range_lead(logits, row_start, row_count), dtype=torch.float32) for _ in range(5))
    loss = logits.new_empty((), dtype=torch.float32)
    means = logits.new_empty((2,), dtype=torch.float32)
    grad_shape = logits.shape if with_grad else (0,)
    return (loss,) + per_token + (torch.empty(grad_shape, dtype=logits.dtype, device=logits.device), means)


def _fused_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    forward_grads.keep(ctx, output[6:7])


def _fused_backward(ctx, g_loss, *unused):
    # dlogits was computed for an upstream gradient of 1; handed over without a copy (ops/_forward_grads.py)
    return forward_grads.hand_over(ctx, g_loss, "ppo_loss (forward-with-gradient)") + (None,) * 20


ppo_loss_fused_call = eager_autograd(ppo_loss_fused, _ppo_loss_fused, _fused_backward, _fused_setup_context)
_ppo_loss_forward_eager = eager_call(ppo_loss_fused, _ppo_loss_fused)


def ppo_loss_forward_call(*args):
    """``ppo_loss_fused`` called with ``with_grad=False``: nothing to record, so under ``no_grad``, where an eager
    call runs the implementation itself (the op where ``needs_the_op`` says so)."""
    with torch.no_grad():
        return _ppo_loss_forward_eager(*args)


def _fused_route(backend: str, logits: torch.Tensor, with_grad: bool, overwrite: bool):
    """``(call, path code)`` of ``ppo_loss_fused`` where ``ppo_loss`` takes it, else ``None`` (the per-token op).

    On cuda one C++ call gives the loss and the logged means: with a gradient the fused step (unless the two-pass
    path is asked for; the setting read once, only where it matters), without one the forward-only kernel and the
    same aggregation kernels (the per-token op and PyTorch's aggregation took ~17 launches, each a Python call:
    host-bound on the H200, run 6). On triton likewise, with ``triton/aggregate.py``'s kernels around the forward
    kernel, or, with a gradient, the fused one (``RLHF_KERNELS_TRITON_PPO``, ``fused`` by default), except where
    the gradient is to be written over the logits, which only the two-pass backward does.
    """
    if backend == "cuda":
        if not with_grad:
            return ppo_loss_forward_call, 0
        path = cuda_ppo_path()
        if path == "two-pass":
            return None
        cuda_ppo_prefetch()  # validated by name; the launcher reads it (and the cluster setting, likewise)
        check_cuda_ppo_path_runs(path, logits, cuda_ppo_cluster())
        return ppo_loss_fused_call, CUDA_PPO_PATHS[path]
    if backend == "triton":
        if not with_grad:
            return ppo_loss_forward_call, 0
        if not overwrite and triton_ppo_path() == "fused":
            return ppo_loss_fused_call, 0
    return None


_PPO_SCALARS = ("temperature", "ignore_index", "kl_coef", "kl_estimator", "entropy_coef", "clip_low", "clip_high",
                "dual_clip", "backend", "row_start", "row_count")


def _ppo_setup_context(ctx, inputs, output):
    logits, targets, old_logp, advantages, ref_logp = inputs[:5]
    _, logp, entropy, _, _, lse = output
    ctx.has_ref = ref_logp is not None
    saved = (logits, targets, logp, entropy, lse, old_logp, advantages) + ((ref_logp,) if ctx.has_ref else ())
    ctx.save_for_backward(*saved)
    ctx.scalars, ctx.overwrite = inputs[5:-1], inputs[-1]  # ppo_term_bwd's scalars (all but overwrite)


def _ppo_backward(ctx, g_term, g_logp, g_ent, g_kl, g_clipped, g_lse):
    logits, targets, logp, entropy, lse, old_logp, advantages, *rest = ctx.saved_tensors
    ref_logp = rest[0] if ctx.has_ref else None
    zeros = [torch.zeros_like(logp) if g is None else g for g in (g_term, g_logp, g_ent, g_kl)]
    args = (*zeros, logits, targets, logp, entropy, lse, old_logp, advantages, ref_logp, *ctx.scalars)
    grad = backward_grad(ctx.overwrite, _term_backward_writer, ppo_term_bwd_call, args, logits, *ctx.scalars[-2:])
    return (grad,) + (None,) * 16


ppo_term_fwd_call = eager_autograd(ppo_term_fwd, _ppo_term_fwd, _ppo_backward, _ppo_setup_context)


def ppo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
    backend: Optional[str] = None,
    overwrite_logits: bool = False,
) -> PPOLossOutput:
    """PPO clipped surrogate loss from logits, with KL penalty and entropy bonus.

    Per token, with ``logp`` the log-prob of ``targets`` under ``logits / temperature``::

        r    = exp(clamp(logp - old_logp, -20, 20))
        pg   = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
        pg   = min(pg, -A·dual_clip)            where A < 0 (when dual_clip is set)
        term = pg + kl_coef·k(logp, ref_logp) - entropy_coef·entropy

    aggregated over ``mask`` by ``loss_agg`` (``token-mean``,
    ``seq-mean-token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-sum-norm``).
    GRPO family (advantages are the group-normalised rewards, broadcast over
    the tokens of each completion; ``kl_estimator="k3"`` with ``ref_logp`` for
    the KL term)::

        grpo     loss_agg="seq-mean-token-mean"      (DeepSeekMath: mean over tokens, then over sequences)
        bnpo     loss_agg="token-mean"               (normalise by the tokens in the batch)
        dr_grpo  loss_agg="seq-mean-token-sum-norm"  (Σ / (num_seqs · T), T = max length; no std scaling of A)
        dapo     loss_agg="token-mean", clip_high > clip_low (e.g. 0.2 / 0.28), kl_coef=0

    ``dual_clip`` (e.g. 3.0) bounds the loss of negative-advantage tokens (Dual-clip PPO).

    Backends: ``"cuda"`` (the default for CUDA tensors when the extension has
    its CUDA kernels) runs ``csrc/cuda/ppo.cu`` and, when ``logits`` requires
    grad, writes ``dlogits`` in the forward itself (the backward is a scale by
    the upstream gradient; paths and ``RLHF_KERNELS_CUDA_PPO`` in this module's
    docstring); ``"triton"`` (the default otherwise) likewise writes ``dlogits``
    in the forward, one program per row (``RLHF_KERNELS_TRITON_PPO=two-pass``:
    a forward kernel to the per-token term, ``dlogits`` in its backward);
    ``"cpu"`` / ``"torch"`` compose the ``logprobs`` op with PyTorch arithmetic.

    Shapes: ``logits[B, T, V]``; ``targets, old_logp, advantages, mask
    (, ref_logp)[B, T]`` (``token-mean`` accepts any leading shape).
    The gradient flows to ``logits`` only. A token with ``mask == 0`` adds 0 to the loss and its gradient row is
    0, whatever its per-token inputs hold (padding's ``-inf`` log-probs, NaN advantages: ``weighted``).
    When ``logits`` is the slice ``base[:, a:a+T]`` of the model's ``[B, L, V]`` output (``logits[:, :-1]``, in
    eager mode), the kernels write the gradient straight into a tensor shaped like
    ``base``, zeroing only the other ``L - T`` rows (``_checks.slice_of_base``).

    ``overwrite_logits=True`` (eager calls): the gradient is written over
    ``logits`` (over their ``[B, L, V]`` base for a ``logits[:, :-1]`` view)
    instead of into a new tensor, so the step needs no gradient-sized buffer
    (bf16 8192 x 151936: 2.4 GB less at the peak). The CUDA fused step writes it
    in the forward (use the logits for nothing after the call); the other paths
    and backends in the backward (``logprobs(overwrite_logits=True)``). Either
    way the logits' version counter moves, so a backward that saved them raises
    instead of reading the gradient. Needs a contiguous base; under
    ``torch.compile`` or without a gradient the logits are left as they are.

    Returns:
        ``PPOLossOutput(loss, logp, entropy, kl, clip_frac, approx_kl)``: the
        differentiable scalar loss, detached per-token ``logp``, ``entropy``,
        ``kl`` and the masked means ``clip_frac`` and ``approx_kl`` (``½·(logp - old_logp)²``).
    """
    check_logits("logits", logits)
    lead = logits.shape[:-1]
    check_tensor("targets", targets, INDEX_DTYPES)
    check_same_shape("targets", targets, lead, "logits.shape[:-1]")
    check_same_device("logits", logits, targets=targets)
    check_ppo_args(
        lead, "logits.shape[:-1]", "logits", logits, old_logp, advantages, mask, ref_logp,
        kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low,
        clip_high=clip_high, dual_clip=dual_clip, loss_agg=loss_agg, ignore_index=ignore_index,
    )
    temperature = check_positive("temperature", temperature)
    if not isinstance(overwrite_logits, bool):
        raise TypeError(f"overwrite_logits must be True or False, got {overwrite_logits!r}")

    if dual_clip is not None:
        dual_clip = float(dual_clip)
    chosen = resolve_for("ppo_loss", logits, backend, IMPLEMENTED)
    # logits[:, a:a+T] of the model's [B, L, V] output: the ops take the base and the range, so the
    # gradient is written into a [B, L, V] tensor (no zero-fill + copy by autograd's SliceBackward)
    source, row_start, row_count = base_and_range(logits)
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    # the registered op never writes over its input: only eager calls overwrite
    overwrite = overwrite_logits and with_grad and not needs_the_op((source,))
    route = _fused_route(chosen, source, with_grad, overwrite)
    if route is not None:
        call, path_code = route
        loss, term, logp, entropy, kl, clipped, _, means = call(
            source,
            targets.long(),
            old_logp.detach().float(),
            advantages.detach().float(),
            None if ref_logp is None else ref_logp.detach().float(),
            mask.detach(),
            temperature,
            int(ignore_index),
            float(kl_coef),
            kl_estimator,
            float(entropy_coef),
            float(clip_low),
            float(clip_high),
            dual_clip,
            loss_agg,
            path_code,
            chosen,
            row_start,
            row_count,
            overwrite,
            with_grad,
        )
        return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg, loss=loss, means=means)
    if chosen in ("triton", "cuda"):
        term, logp, entropy, kl, clipped, _ = ppo_term_fwd_call(
            source,
            targets.long(),
            old_logp.detach().float(),
            advantages.detach().float(),
            None if ref_logp is None else ref_logp.detach().float(),
            temperature,
            int(ignore_index),
            float(kl_coef),
            kl_estimator,
            float(entropy_coef),
            float(clip_low),
            float(clip_high),
            dual_clip,
            chosen,
            row_start,
            row_count,
            overwrite,
        )  # clipped: float32 0 / 1, as ppo_output's clip_frac wants it
    else:
        logp, entropy = logprobs_for(
            "ppo_loss", logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
            backend=chosen, overwrite_logits=overwrite,
        )
        term, kl, clipped = composed_ppo_terms(
            logp, entropy, old_logp, advantages, ref_logp, mask, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        )
    return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg)
