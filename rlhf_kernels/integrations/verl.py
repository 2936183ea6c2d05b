"""Drop-in replacements for verl's log-prob, entropy and PPO policy-loss functions.

Checked against verl 0.9.1 (``verl.utils.torch_functional`` and
``verl.trainer.ppo.core_algos``). verl itself is not imported: use these by
importing them in place of verl's (or by assigning them onto verl's modules in
your own code; nothing is patched here, DESIGN.md §7)::

    from rlhf_kernels.integrations import verl as rk_verl

    log_prob = rk_verl.logprobs_from_logits(logits, responses)       # fused, float32
    entropy = rk_verl.entropy_from_logits(logits)                     # fused
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = rk_verl.compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask,
        cliprange=0.2, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
        loss_agg_mode="seq-mean-token-mean")

``loss_agg_mode`` names are verl's, and the four shared ones are also
``rk.aggregate_loss``'s ``loss_agg`` names. With ``S = Σ mask·loss`` (per
sequence ``S_b``), ``B`` sequences of which ``B'`` have at least one token,
``L = mask.shape[-1]`` and verl's defaults ``dp_size=1``,
``batch_num_tokens=Σ mask``, ``global_batch_size=B'``, ``loss_scale_factor=L``:

- ``token-mean``: verl ``S / Σ mask`` (NaN for an empty mask); rk ``S / Σ mask`` (0).
  Equal whenever the mask is not empty.
- ``seq-mean-token-mean`` (GRPO): both ``Σ_b S_b / n_b`` over non-empty sequences, ``/ B'``.
  Equal (verl adds 1e-8 to ``n_b``).
- ``seq-mean-token-sum``: verl ``S / B'``; rk ``S / B``. Equal when no sequence is empty.
- ``seq-mean-token-sum-norm`` (Dr. GRPO): verl ``S / (B'·L)``; rk ``S / (B·L)``.
  Equal when no sequence is empty.
- ``token-sum``: verl ``S``; no rk mode (use ``(loss * mask).sum()``).

``agg_loss`` here reproduces verl's semantics exactly (including ``dp_size``,
``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) on top of
``rk.aggregate_loss``; the one deliberate difference is that an empty batch
gives 0 instead of NaN. Older verl releases divided ``seq-mean-token-sum-norm``
by ``L`` only (no ``B``): pass ``global_batch_size=1`` for that.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import reference
from ..ops._checks import check_same_shape
from ..ops.logprobs import logprobs as _rk_logprobs
from ..ops.losses import aggregate_loss as _rk_aggregate_loss
from ._ids import check_ids

__all__ = [
    "LOSS_AGG_MODES",
    "agg_loss",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "logprobs_from_logits",
]

LOSS_AGG_MODES = reference.LOSS_AGG_MODES + ("token-sum",)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """verl's ``logprobs_from_logits``: ``log_softmax(logits).gather(-1, labels)``, fused.

    ``logits[..., V]``, ``labels[...]`` -> float32 ``[...]`` (the dtype of verl's
    flash-attn cross-entropy path, the one verl uses on GPUs). Gradients flow to
    ``logits`` in its dtype. ``inplace_backward`` is accepted for signature
    compatibility: the fused backward writes ``dlogits`` once and never holds
    a float32 ``[N, V]`` copy, which is what flash-attn's in-place backward saves.
    """
    del inplace_backward
    check_ids("labels", labels, logits)
    return _rk_logprobs(logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits``: ``logsumexp(z) - Σ softmax(z)·z`` per row, fused.

    ``logits[..., V]`` -> ``[...]`` in ``logits.dtype`` (verl's dtype), reduced in
    float32; differentiable.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., vocab_size), got {tuple(logits.shape)}")
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _rk_logprobs(logits, targets, return_entropy=True)
    return entropy.to(logits.dtype)


def entropy_from_logits_with_chunking(logits: torch.Tensor, chunk_size: int = 2048) -> torch.Tensor:
    """verl's chunked variant; the fused op needs no chunking, so ``chunk_size`` is ignored (>= 1)."""
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    return entropy_from_logits(logits)


def agg_loss(
    loss_mat: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: Optional[Any] = None,
    global_batch_size: Optional[Any] = None,
    loss_scale_factor: Optional[Any] = None,
) -> torch.Tensor:
    """verl's ``agg_loss`` (0.9.1 semantics, see the module docstring), built on ``rk.aggregate_loss``.

    ``loss_mat, loss_mask: [B, T]`` -> scalar. Entries outside the mask are
    ignored even when NaN/Inf (like verl's ``masked_sum``).
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    check_same_shape("loss_mask", loss_mask, loss_mat.shape, "loss_mat")
    mask = loss_mask.to(loss_mat.dtype)
    term = torch.where(loss_mask.bool(), loss_mat, torch.zeros_like(loss_mat))
    if loss_agg_mode == "token-sum":
        return (term * mask).sum() * dp_size
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            return _rk_aggregate_loss(term, mask, "token-mean")
        return _rk_aggregate_loss(term, mask, "token-mean") * mask.sum() / batch_num_tokens * dp_size
    if term.dim() < 2:
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} needs [batch, response_length] inputs, got {tuple(term.shape)}"
        )
    num_seqs = term.numel() // term.shape[-1]
    non_empty = (mask.sum(-1) > 0).sum().to(term.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        global_batch_size = non_empty
    local = _rk_aggregate_loss(term, mask, loss_agg_mode)
    if loss_agg_mode == "seq-mean-token-mean":
        scale = non_empty  # rk: Σ_b' mean_b / B'  ->  Σ_b' mean_b
    elif loss_agg_mode == "seq-mean-token-sum":
        scale = num_seqs  # rk: S / B  ->  S
    else:  # seq-mean-token-sum-norm; rk: S / (B·L) -> S / lsf
        horizon = term.shape[-1]
        lsf = horizon if loss_scale_factor is None else loss_scale_factor
        scale = num_seqs * horizon / lsf
    total = local * scale
    denom = torch.as_tensor(global_batch_size, dtype=term.dtype, device=term.device)
    # An empty batch gives 0 (verl: 0/0 = NaN).
    return torch.where(denom != 0, total / torch.where(denom != 0, denom, torch.ones_like(denom)), total * 0) * dp_size


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean``: ``Σ mask·values / (Σ mask + 1e-8)``."""
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    return (values * mask).sum() / (mask.sum() + 1e-8)


def _policy_loss(
    old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, loss_agg_mode,
    rollout_is_weights=None, global_batch_info=None,
):
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"The lower bound of the clip_ratio_c for dual-clip PPO should be greater than 1.0, but got {clip_ratio_c}"
        )
    if clip_low is None or clip_high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    for name, value in (("old_log_prob", old_log_prob), ("advantages", advantages), ("response_mask", response_mask)):
        check_same_shape(name, value, log_prob.shape, "log_prob")
    # Per-token PPO term with dual clip: the project's reference semantics (DESIGN.md §2, ppo_loss).
    pg_losses, _, _ = reference.ppo_token_terms(
        log_prob,
        torch.zeros_like(log_prob),
        old_log_prob,
        advantages,
        ref_logp=None,
        kl_coef=0.0,
        kl_estimator="k3",
        entropy_coef=0.0,
        clip_low=float(clip_low),
        clip_high=float(clip_high),
        dual_clip=float(clip_ratio_c),
    )
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(pg_losses, response_mask, loss_agg_mode, **(global_batch_info or {}))
    with torch.no_grad():
        neg_kl = (log_prob - old_log_prob).clamp(-20.0, 20.0)
        ratio = neg_kl.exp()
        pg1 = -advantages * ratio
        pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
        clipped = torch.maximum(pg1, pg2)
        pg_clipfrac = _masked_mean((pg2 > pg1).to(log_prob.dtype), response_mask)
        ppo_kl = _masked_mean(-neg_kl, response_mask)
        lower = (clipped > -advantages * clip_ratio_c) & (advantages < 0)
        pg_clipfrac_lower = _masked_mean(lower.to(log_prob.dtype), response_mask)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    cliprange: Optional[float] = None,
    cliprange_low: Optional[float] = None,
    cliprange_high: Optional[float] = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """verl's ``compute_policy_loss``: PPO clipped objective with dual clip, same arguments and results.

    Per token (all ``[B, T]``)::

        r    = exp(clamp(log_prob - old_log_prob, -20, 20))
        pg   = max(-A·r, -A·clip(r, 1 - cliprange_low, 1 + cliprange_high))
        pg   = min(pg, -A·clip_ratio_c)     where A < 0

    aggregated by ``agg_loss(pg, response_mask, loss_agg_mode)``.
    ``cliprange_low/high`` default to ``cliprange``.

    Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``: the
    differentiable loss (gradient to ``log_prob``), the masked fraction of
    tokens where the clipped branch is active, ``masked_mean(old_log_prob -
    log_prob)`` and the fraction where the dual clip is active.
    """
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return _policy_loss(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode)


def _config_get(config, name, default=None):
    value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
    return default if value is None else value


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Optional[Any] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Dict[str, float]]:
    """verl 0.9's registered ``"vanilla"`` policy loss: same math as ``compute_policy_loss``.

    ``config`` is verl's ``ActorConfig`` or any object / dict with
    ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high`` (``None`` -> ``clip_ratio``),
    ``clip_ratio_c`` (default 3.0) and optionally ``global_batch_info``
    (``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``
    for ``agg_loss``). ``rollout_is_weights[B, T]`` multiplies the per-token loss.

    Returns ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``.
    """
    if config is None:
        raise ValueError("config (verl ActorConfig or a dict with clip_ratio, ...) is required")
    clip_ratio = _config_get(config, "clip_ratio")
    low = _config_get(config, "clip_ratio_low", clip_ratio)
    high = _config_get(config, "clip_ratio_high", clip_ratio)
    clip_ratio_c = _config_get(config, "clip_ratio_c", 3.0)
    global_batch_info = _config_get(config, "global_batch_info", None) or {}
    pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower = _policy_loss(
        old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, loss_agg_mode,
        rollout_is_weights=rollout_is_weights, global_batch_info=dict(global_batch_info),
    )
    metrics = {
        "actor/pg_clipfrac": pg_clipfrac.item(),
        "actor/ppo_kl": ppo_kl.item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.item(),
    }
    return pg_loss, metrics
