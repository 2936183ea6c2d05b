"""The oracle: every op of DESIGN.md §2 in plain, readable PyTorch.

These functions define the semantics every fast backend must match. They are
written for clarity, not speed: they materialise full ``[N, V]`` tensors.
They compute in the promoted dtype of their inputs and at least float32, so
passing float64 tensors gives a float64 oracle (the tests do exactly that).

Notation (per token): ``z = logits / temperature``, ``lse = logsumexp(z)``,
``p = softmax(z)``, ``y`` the target id.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def clamp_closed(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``x.clamp(low, high)`` whose gradient passes on the closed interval ``[low, high]``, bounds included.

    ``torch.clamp``'s own choice at a bound changed between releases (torch 2.6 passes the gradient there,
    torch 2.14 does not), which would make this oracle's gradients, and the kernels' agreement with them, depend
    on the torch installed wherever a value lands exactly on a bound (16-bit log-probs often do). Every kernel
    passes it on the closed interval.
    """
    return torch.where((x >= low) & (x <= high), x, x.clamp(low, high).detach())


def _xlogy_safe(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p * x`` with the convention ``0 * (-inf) = 0`` (masked vocabulary entries).

    ``x`` is replaced before the product so the gradient stays finite too.
    """
    return p * torch.where(p > 0, x, torch.zeros_like(x))


def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """Log-probability of the target token (and the entropy) per row.

    ``logp = z[y] - lse``; ``entropy = lse - Σ p·z = -Σ p·log p``.
    Both are 0 where ``targets == ignore_index``.

    Shapes: ``logits[*, V]``, ``targets[*]`` -> ``logp[*]`` (and ``entropy[*]``).
    """
    dtype = _compute_dtype(logits)
    z = logits.to(dtype) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = log_p.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -_xlogy_safe(log_p.exp(), log_p).sum(-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-token sample estimate of KL(π ‖ π_ref) from the sampled token's log-probs.

    With ``d = ref_logp - logp``: ``k1 = -d``, ``k2 = ½·d²``, ``k3 = exp(d) - d - 1``
    (Schulman's unbiased, always non-negative estimator). ``clamp`` clips the
    result to ``[-clamp, clamp]``.
    """
    d = ref_logp - logp
    if estimator == "k1":
        kl = -d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.expm1(d) - d
    else:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        kl = clamp_closed(kl, -clamp, clamp)
    return kl


def kl_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact full-vocabulary ``KL(softmax(z) ‖ softmax(r))`` per row.

    ``KL = Σ p·(log p - log q)`` with ``log p = z - lse_z``, ``log q = r - lse_r``;
    0 where ``mask == 0``, with a gradient of 0 there. Shapes: ``[*, V]`` x2 (+ ``mask[*]``) -> ``[*]``.
    """
    dtype = _compute_dtype(logits, ref_logits)
    if mask is not None:  # a masked row's gradient is 0, even where its KL is infinite (without_gradient_where)
        logits = without_gradient_where(logits, mask.unsqueeze(-1))
        ref_logits = without_gradient_where(ref_logits, mask.unsqueeze(-1))
    log_p = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(ref_logits.to(dtype) / temperature, dim=-1)
    kl = _xlogy_safe(log_p.exp(), log_p - log_q).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


def _safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` that is 0 (with finite gradients) where ``den == 0``."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x·mask``, exactly 0 where ``mask == 0`` even where ``x`` is not finite: a masked-out token (padding, a
    prompt) never turns a sum over the batch into NaN (DESIGN §2: a non-finite value stays in its own token).
    Its gradient to ``x`` there is 0 times ``x``'s own derivative, as with the plain product (NaN where that
    derivative is infinite: ``without_gradient_where`` keeps such a token out of the gradient as well)."""
    return torch.where(mask != 0, x * mask, 0.0)


def without_gradient_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` itself, whose gradient is exactly 0 where ``mask == 0`` (``mask`` broadcast against ``x``).

    A masked-out token adds 0 to the loss (``masked``), so it must add 0 to the gradient too, even where the
    derivative of its term is not finite: an infinite KL estimate (a target or reference log-prob of -inf), a
    NaN advantage or return left in a padded position. Autograd would give ``0·inf = NaN`` there, and that NaN
    would spread from the token's logits to every weight of the model. A ``where`` *selects* instead of
    multiplying: the gradient reaching ``x`` through the detached branch is dropped, not scaled by 0.
    """
    return torch.where(mask != 0, x, x.detach())


def aggregate_loss(term: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token ``term[B, T]`` under ``mask[B, T]`` to a scalar.

    - ``token-mean``: ``Σ m·term / Σ m`` (any shape).
    - ``seq-mean-token-mean``: mean over sequences with at least one token of
      each sequence's ``Σ_t m·term / Σ_t m`` (GRPO).
    - ``seq-mean-token-sum``: mean over all sequences of ``Σ_t m·term``.
    - ``seq-mean-token-sum-norm``: ``Σ m·term / (B·T)`` (Dr. GRPO; ``T`` = mask's last dim).

    The sequence axis is the last one; all leading axes index sequences.
    An empty mask gives 0, never NaN; a token with ``m = 0`` adds nothing, even where its ``term`` is not finite
    (``masked``).
    """
    mask = mask.to(term.dtype)
    if loss_agg == "token-mean":
        return _safe_divide(masked(term, mask).sum(), mask.sum())
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
    if term.dim() < 2:
        raise ValueError(f"loss_agg={loss_agg!r} needs [num_seqs, seq_len] inputs, got term of shape {tuple(term.shape)}")
    seq_sum = masked(term, mask).sum(-1).reshape(-1)
    if loss_agg == "seq-mean-token-sum":
        return seq_sum.mean()
    if loss_agg == "seq-mean-token-sum-norm":
        return seq_sum.sum() / (seq_sum.numel() * term.shape[-1])
    seq_len = mask.sum(-1).reshape(-1)
    non_empty = (seq_len > 0).to(term.dtype)
    return _safe_divide(_safe_divide(seq_sum, seq_len).sum(), non_empty.sum())


class PPOLossOutput(NamedTuple):
    """Result of ``ppo_loss``: the differentiable scalar ``loss`` and detached statistics.

    ``logp``, ``entropy``, ``kl`` are per token (``kl`` is 0 when no ``ref_logp``);
    ``clip_frac`` is the masked fraction of tokens whose clipped surrogate was
    active; ``approx_kl`` is the masked mean of ``½·(logp - old_logp)²``.
    """

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def ppo_token_terms(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logp: Optional[torch.Tensor],
    kl_coef: float,
    kl_estimator: str,
    entropy_coef: float,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float],
):
    """Per-token PPO objective from per-token log-probs and entropies.

    ``r = exp(clamp(logp - old_logp, ±20))``;
    ``pg = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))``;
    dual clip ``c``: where ``A < 0``, ``pg = min(pg, -A·c)``;
    ``term = pg + kl_coef·k(logp, ref_logp) - entropy_coef·entropy``.

    Returns ``(term, kl, clipped)`` with ``clipped`` a bool tensor.
    """
    log_ratio = clamp_closed(logp - old_logp, -20.0, 20.0)
    ratio = log_ratio.exp()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * clamp_closed(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    clipped = pg_clipped > pg_unclipped
    if dual_clip is not None:
        pg_dual = -advantages * dual_clip
        use_dual = (advantages < 0) & (pg_dual < pg)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)
        clipped = clipped | use_dual
    if ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
    else:
        kl = torch.zeros_like(logp)
    term = pg + kl_coef * kl - entropy_coef * entropy
    return term, kl, clipped


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
) -> PPOLossOutput:
    """PPO clipped policy loss straight from logits (formula in ``ppo_token_terms``).

    Shapes: ``logits[B, T, V]``, ``targets/old_logp/advantages/mask[B, T]``
    (``token-mean`` accepts any leading shape). Gradient flows to ``logits`` only; a token with ``mask == 0``
    adds 0 to the loss and to the gradient, whatever its inputs (``without_gradient_where``).
    """
    logp, entropy = logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    dtype = logp.dtype
    term, kl, clipped = ppo_token_terms(
        without_gradient_where(logp, mask),  # a masked token's gradient is 0, even where its term's slope is not finite
        entropy,
        old_logp.detach().to(dtype),
        advantages.detach().to(dtype),
        ref_logp=None if ref_logp is None else ref_logp.detach().to(dtype),
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        entropy_coef=entropy_coef,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    loss = aggregate_loss(term, mask, loss_agg)
    with torch.no_grad():
        maskf = mask.to(dtype)
        clip_frac = _safe_divide(masked(clipped.to(dtype), maskf).sum(), maskf.sum())
        approx_kl = _safe_divide(masked(0.5 * (logp - old_logp.to(dtype)) ** 2, maskf).sum(), maskf.sum())
    return PPOLossOutput(loss, logp.detach(), entropy.detach(), kl.detach(), clip_frac, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    loss_agg: str = "token-mean",
) -> torch.Tensor:
    """Clipped value loss ``½·max((v - R)², (clip(v, v_old ± clip) - R)²)``, aggregated.

    ``clip=None`` gives the plain ``½·(v - R)²``. Shapes: all ``[B, T]``. A token with ``mask == 0`` adds 0 to
    the loss and to the gradient, whatever its inputs (``without_gradient_where``).
    """
    values = without_gradient_where(values, mask)
    unclipped = (values - returns) ** 2
    if clip is None:
        term = 0.5 * unclipped
    else:
        v_clipped = old_values + clamp_closed(values - old_values, -clip, clip)
        term = 0.5 * torch.maximum(unclipped, (v_clipped - returns) ** 2)
    return aggregate_loss(term, mask, loss_agg)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
):
    """Generalised advantage estimation by a reverse scan over time.

    ``δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t``; ``A_t = δ_t + γλ·A_{t+1}·m_{t+1}``
    (``V_T = A_T = 0``); ``returns = A + V``; both 0 where ``mask == 0``.
    Shapes: ``[B, T]`` -> ``(advantages[B, T], returns[B, T])``.

    The products with ``m`` are ``masked``'s: a masked step (padding) adds exactly nothing, to its own outputs or to
    the steps before it, even where its reward or value is NaN or infinite (``0·inf`` would be NaN, and the scan
    would carry it to every earlier token of the sequence).
    """
    mask = mask.to(values.dtype)
    T = rewards.shape[-1]
    # new_zeros, not zeros_like(values[..., 0]): T = 0 (no tokens) must give empty outputs, not an IndexError
    next_value = values.new_zeros(values.shape[:-1])
    next_adv = values.new_zeros(values.shape[:-1])
    next_mask = values.new_zeros(values.shape[:-1])
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        delta = rewards[..., t] + gamma * next_value * next_mask - values[..., t]
        adv = delta + gamma * lam * next_adv * next_mask
        advantages[..., t] = adv
        on = mask[..., t] != 0
        next_value, next_adv, next_mask = torch.where(on, values[..., t], 0.0), torch.where(on, adv, 0.0), mask[..., t]
    # returns from the unmasked A: (A + V)·m, as the kernels; (A·m + V)·m would differ for a mask that is not 0 / 1
    returns = masked(advantages + values, mask)
    advantages = masked(advantages, mask)
    return advantages, returns


def reward_model_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin=None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry loss ``mean(-logsigmoid(r_c - r_r - margin) + center_coef·(r_c + r_r)²)``."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.mean()


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO family on sequence log-probs, averaged over pairs.

    ``h = (π_c - π_r) - (ref_c - ref_r)``;
    sigmoid: ``-(1-ε)·logσ(β·h) - ε·logσ(-β·h)``; ipo: ``(h - 1/(2β))²``;
    hinge: ``relu(1 - β·h)``.
    """
    h = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    return loss.mean()


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """``logprobs(hidden @ weight.T + bias, targets)``; ``hidden[*, H]``, ``weight[V, H]``."""
    dtype = _compute_dtype(hidden, weight)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )
