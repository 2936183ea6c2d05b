"""Small scalar losses: value loss, Bradley–Terry reward-model loss, DPO family, and loss aggregation."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._checks import FLOAT_DTYPES, check_choice, check_number, check_same_device, check_same_shape, check_tensor


def aggregate_loss(term: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token-mean") -> torch.Tensor:
    """Reduce per-token ``term[B, T]`` under ``mask[B, T]`` (see ``reference.aggregate_loss``).

    ``token-mean``: ``Σ m·term / Σ m``; ``seq-mean-token-mean``: mean of per-sequence means
    (GRPO); ``seq-mean-token-sum``: mean of per-sequence sums; ``seq-mean-token-sum-norm``:
    ``Σ m·term / (B·T)`` (Dr. GRPO). An empty mask gives 0.
    """
    check_tensor("term", term, FLOAT_DTYPES)
    check_tensor("mask", mask)
    check_same_shape("mask", mask, term.shape, "term")
    check_same_device("term", term, mask=mask)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGG_MODES)
    return reference.aggregate_loss(term, mask, loss_agg)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: Optional[float] = 0.2,
    loss_agg: str = "token-mean",
) -> torch.Tensor:
    """Clipped critic loss ``½·max((v - R)², (clip(v, v_old ± clip) - R)²)``, aggregated by ``loss_agg``.

    ``clip=None`` disables clipping. Shapes: all ``[B, T]`` -> scalar.
    """
    check_tensor("values", values, FLOAT_DTYPES)
    for name, value in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        check_tensor(name, value, None if name == "mask" else FLOAT_DTYPES)
        check_same_shape(name, value, values.shape, "values")
    check_same_device("values", values, old_values=old_values, returns=returns, mask=mask)
    check_choice("loss_agg", loss_agg, reference.LOSS_AGG_MODES)
    if clip is not None:
        clip = check_number("clip", clip, low=0.0, low_open=True)
    return reference.value_loss(values, old_values, returns, mask, clip=clip, loss_agg=loss_agg)


def reward_model_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin=None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry loss ``mean(-log σ(r_c - r_r - margin)) + center_coef·mean((r_c + r_r)²)``.

    Shapes: ``r_chosen, r_rejected: [B]`` (``margin``: float or ``[B]``) -> scalar.
    """
    check_tensor("r_chosen", r_chosen, FLOAT_DTYPES)
    check_tensor("r_rejected", r_rejected, FLOAT_DTYPES)
    check_same_shape("r_rejected", r_rejected, r_chosen.shape, "r_chosen")
    if isinstance(margin, torch.Tensor):
        check_tensor("margin", margin, FLOAT_DTYPES)
        check_same_shape("margin", margin, r_chosen.shape, "r_chosen")
        check_same_device("r_chosen", r_chosen, margin=margin)
    elif margin is not None:
        margin = check_number("margin", margin)
    center_coef = check_number("center_coef", center_coef)
    check_same_device("r_chosen", r_chosen, r_rejected=r_rejected)
    return reference.reward_model_loss(r_chosen, r_rejected, margin=margin, center_coef=center_coef)


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
    """DPO / IPO / hinge loss on sequence log-probs, averaged over pairs.

    ``h = (π_c - π_r) - (ref_c - ref_r)``; sigmoid: ``-(1-ε)·log σ(β·h) - ε·log σ(-β·h)``;
    ipo: ``(h - 1/(2β))²``; hinge: ``relu(1 - β·h)``. Shapes: four ``[B]`` -> scalar.
    """
    check_tensor("pi_chosen", pi_chosen, FLOAT_DTYPES)
    for name, value in (("pi_rejected", pi_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        check_tensor(name, value, FLOAT_DTYPES)
        check_same_shape(name, value, pi_chosen.shape, "pi_chosen")
    check_same_device("pi_chosen", pi_chosen, pi_rejected=pi_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    check_choice("loss_type", loss_type, reference.DPO_LOSS_TYPES)
    beta = check_number("beta", beta, low=0.0, low_open=True)
    label_smoothing = check_number("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    return reference.dpo_loss(
        pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
