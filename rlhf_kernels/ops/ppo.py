"""``ppo_loss``: the PPO clipped policy loss straight from logits.

The log-prob and entropy come from the fused ``logprobs`` op (one pass over the
vocabulary, gradient written straight into ``dlogits``); the per-token PPO
arithmetic on ``[B, T]`` tensors is plain PyTorch until the fused kernel lands.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..reference import PPOLossOutput
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_choice,
    check_logits,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from .logprobs import logprobs

__all__ = ["PPOLossOutput", "ppo_loss"]


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
    GRPO variants: grpo = ``seq-mean-token-mean``; bnpo / DAPO = ``token-mean``
    (DAPO with ``clip_high > clip_low``); Dr. GRPO = ``seq-mean-token-sum-norm``.

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
    for name, value in (("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if value is not None:
            check_tensor(name, value, FLOAT_DTYPES)
            check_same_shape(name, value, lead, "logits.shape[:-1]")
    check_tensor("mask", mask)
    check_same_shape("mask", mask, lead, "logits.shape[:-1]")
    check_same_device(
        "logits", logits, targets=targets, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp
    )
    check_choice("kl_estimator", kl_estimator, reference.KL_ESTIMATORS)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGG_MODES)
    if loss_agg != "token-mean" and len(lead) < 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs logits of shape [B, T, V], got {tuple(logits.shape)}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not 0.0 <= float(value):
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), got {clip_low!r}")
    if dual_clip is not None and not float(dual_clip) > 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip!r}")
    if kl_coef and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    temperature = check_positive("temperature", temperature)

    logp, entropy = logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True, backend=backend
    )
    term, kl, clipped = reference.ppo_token_terms(
        logp,
        entropy,
        old_logp.detach().to(logp.dtype),
        advantages.detach().to(logp.dtype),
        ref_logp=None if ref_logp is None else ref_logp.detach().to(logp.dtype),
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    loss = reference.aggregate_loss(term, mask, loss_agg)
    with torch.no_grad():
        maskf = mask.to(logp.dtype)
        clip_frac = reference._safe_divide((clipped.to(logp.dtype) * maskf).sum(), maskf.sum())
        approx_kl = reference._safe_divide((0.5 * (logp - old_logp.to(logp.dtype)) ** 2 * maskf).sum(), maskf.sum())
    return PPOLossOutput(loss, logp.detach(), entropy.detach(), kl.detach(), clip_frac, approx_kl)
