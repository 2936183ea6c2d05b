"""``ppo_loss``: the PPO clipped policy loss straight from logits.

Triton backend: one fused kernel (``rlhf_kernels::ppo_term_fwd``) goes from
logits to the per-token PPO term (log-prob, entropy, ratio, clips, KL
estimator, entropy bonus) in one read of the vocabulary; its backward
(``rlhf_kernels::ppo_term_bwd``) computes the per-token derivative of the term
in-kernel and writes ``dlogits`` directly. The ``loss_agg`` reduction over
``[B, T]`` stays in PyTorch around it; its gradient reaches the kernel as a
per-token weight. Other backends compose the fused ``logprobs`` op (C++ CPU
kernel or reference) with the per-token arithmetic in PyTorch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import reference
from ..reference import PPOLossOutput
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    as_rows,
    check_choice,
    check_logits,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from .logprobs import IMPLEMENTED as _LOGPROBS_IMPLEMENTED
from .logprobs import _torch_bwd, _torch_fwd, _validate_targets, logprobs, resolve_for

__all__ = ["PPOLossOutput", "check_ppo_args", "composed_ppo_terms", "ppo_loss", "ppo_output"]

# Triton runs the fused kernel; the others compose ``logprobs`` with PyTorch arithmetic.
IMPLEMENTED = tuple(dict.fromkeys(("triton",) + tuple(_LOGPROBS_IMPLEMENTED)))


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
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
    loss_agg: str,
) -> None:
    """The checks shared by ``ppo_loss`` and ``linear_ppo_loss``: per-token inputs of shape ``lead`` and the options."""
    for name, value in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if value is not None:
            check_tensor(name, value, FLOAT_DTYPES)
            check_same_shape(name, value, lead, lead_from)
    check_tensor("mask", mask)
    check_same_shape("mask", mask, lead, lead_from)
    check_same_device(device_name, device_tensor, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp)
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGG_MODES)
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not 0.0 <= float(value):
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), got {clip_low!r}")
    if dual_clip is not None and not float(dual_clip) > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")


def composed_ppo_terms(logp, entropy, old_logp, advantages, ref_logp, **options):
    """``reference.ppo_token_terms`` on detached per-token inputs cast to ``logp``'s dtype (the non-fused path)."""
    dtype = logp.dtype
    return reference.ppo_token_terms(
        logp,
        entropy,
        old_logp.detach().to(dtype),
        advantages.detach().to(dtype),
        ref_logp=None if ref_logp is None else ref_logp.detach().to(dtype),
        **options,
    )


def ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg: str) -> PPOLossOutput:
    """Aggregate the per-token ``term`` and attach the detached statistics users log."""
    loss = reference.aggregate_loss(term, mask, loss_agg)
    with torch.no_grad():
        maskf = mask.to(logp.dtype)
        clip_frac = reference._safe_divide((clipped.to(logp.dtype) * maskf).sum(), maskf.sum())
        approx_kl = reference._safe_divide((0.5 * (logp - old_logp.to(logp.dtype)) ** 2 * maskf).sum(), maskf.sum())
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


@torch.library.custom_op("rlhf_kernels::ppo_term_fwd", mutates_args=())
def ppo_term_fwd(
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO term from ``logits[*, V]``: ``(term, logp, entropy, kl, clipped, lse)``, each float32 ``[*]``.

    ``old_logp``, ``advantages`` (and ``ref_logp``) are float32 ``[*]``;
    ``clipped`` is 1.0 where a clip was active. Backends ``triton`` (fused) and
    ``torch`` (reference math).
    """
    _validate_targets(targets, logits.shape[-1], ignore_index)
    lead = logits.shape[:-1]
    rows = as_rows(logits)
    shape2 = rows.shape[:2]
    flat = [None if t is None else t.reshape(shape2) for t in (targets, old_logp, advantages, ref_logp)]
    if backend == "triton":
        from ..triton.ppo import ppo_term_fwd as triton_fwd

        out = triton_fwd(
            rows, *flat, temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip
        )
    else:
        logp, entropy, lse = _torch_fwd(rows.float(), flat[0], temperature, ignore_index)
        term, kl, clipped = reference.ppo_token_terms(
            logp, entropy, flat[1], flat[2], ref_logp=flat[3], kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        )
        out = (term, logp, entropy, kl, clipped.float(), lse)
    return tuple(t.reshape(lead).contiguous() for t in out)


@ppo_term_fwd.register_fake
def _(logits, targets, old_logp, advantages, ref_logp, temperature, ignore_index, kl_coef, kl_estimator,
      entropy_coef, clip_low, clip_high, dual_clip, backend):
    return tuple(logits.new_empty(logits.shape[:-1], dtype=torch.float32) for _ in range(6))


@torch.library.custom_op("rlhf_kernels::ppo_term_bwd", mutates_args=())
def ppo_term_bwd(
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
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` of ``Σ g_term·term + g_logp·logp + g_H·entropy + g_kl·kl``, in ``logits.dtype``."""
    rows = as_rows(logits)
    shape2 = rows.shape[:2]
    per_token = [
        None if t is None else t.reshape(shape2).float()
        for t in (grad_term, grad_logp, grad_entropy, grad_kl, logp, entropy, lse, old_logp, advantages, ref_logp)
    ]
    g_term, g_logp, g_ent, g_kl, lp, ent, lse_, old, adv, ref = per_token
    flat_targets = targets.reshape(shape2)
    if backend == "triton":
        from ..triton.ppo import ppo_term_bwd as triton_bwd

        grad = triton_bwd(
            g_term, g_logp, g_ent, g_kl, rows, flat_targets, lp, ent, lse_, old, adv, ref, temperature,
            ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip,
        )
    else:
        dterm, dk = _torch_dterm_dlogp(lp, old, adv, ref, kl_coef, kl_estimator, clip_low, clip_high, dual_clip)
        total_logp = g_logp + g_term * dterm + g_kl * dk
        total_ent = g_ent - g_term * entropy_coef
        grad = _torch_bwd(total_logp, total_ent, rows, flat_targets.contiguous(), lse_, ent, temperature, ignore_index)
    return grad.reshape(logits.shape)


@ppo_term_bwd.register_fake
def _(grad_term, grad_logp, grad_entropy, grad_kl, logits, targets, logp, entropy, lse, old_logp, advantages,
      ref_logp, temperature, ignore_index, kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


_PPO_SCALARS = ("temperature", "ignore_index", "kl_coef", "kl_estimator", "entropy_coef", "clip_low", "clip_high",
                "dual_clip", "backend")


def _ppo_setup_context(ctx, inputs, output):
    logits, targets, old_logp, advantages, ref_logp = inputs[:5]
    _, logp, entropy, _, _, lse = output
    ctx.has_ref = ref_logp is not None
    saved = (logits, targets, logp, entropy, lse, old_logp, advantages) + ((ref_logp,) if ctx.has_ref else ())
    ctx.save_for_backward(*saved)
    ctx.scalars = inputs[5:]


def _ppo_backward(ctx, g_term, g_logp, g_ent, g_kl, g_clipped, g_lse):
    logits, targets, logp, entropy, lse, old_logp, advantages, *rest = ctx.saved_tensors
    ref_logp = rest[0] if ctx.has_ref else None
    zeros = [torch.zeros_like(logp) if g is None else g for g in (g_term, g_logp, g_ent, g_kl)]
    grad = ppo_term_bwd(*zeros, logits, targets, logp, entropy, lse, old_logp, advantages, ref_logp, *ctx.scalars)
    return (grad,) + (None,) * 13


ppo_term_fwd.register_autograd(_ppo_backward, setup_context=_ppo_setup_context)


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

    Backends: ``"triton"`` (the default for CUDA tensors) runs one fused kernel
    from logits to the per-token term and writes ``dlogits`` in its backward;
    ``"cpu"`` / ``"torch"`` compose the ``logprobs`` op with PyTorch arithmetic.

    Shapes: ``logits[B, T, V]``; ``targets, old_logp, advantages, mask
    (, ref_logp)[B, T]`` (``token-mean`` accepts any leading shape).
    The gradient flows to ``logits`` only.

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
        kl_coef=kl_coef, kl_estimator=kl_estimator, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        loss_agg=loss_agg,
    )
    if loss_agg != "token-mean" and len(lead) < 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs logits of shape [B, T, V], got {tuple(logits.shape)}")
    temperature = check_positive("temperature", temperature)

    if dual_clip is not None:
        dual_clip = float(dual_clip)
    chosen = resolve_for("ppo_loss", logits, backend, IMPLEMENTED)
    if chosen == "triton":
        term, logp, entropy, kl, clipped, _ = ppo_term_fwd(
            logits,
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
        )
        clipped = clipped.bool()
    else:
        logp, entropy = logprobs(
            logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True, backend=chosen
        )
        term, kl, clipped = composed_ppo_terms(
            logp, entropy, old_logp, advantages, ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
            entropy_coef=entropy_coef, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
        )
    return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg)
