"""KL ops: per-token sample estimators (k1/k2/k3) and the exact full-vocabulary KL."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._checks import FLOAT_DTYPES, check_choice, check_logits, check_positive, check_same_device, check_same_shape, check_tensor


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[float] = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from sampled-token log-probs.

    With ``d = ref_logp - logp``: ``k1 = -d``; ``k2 = ½·d²``;
    ``k3 = exp(d) - d - 1`` (unbiased and non-negative). ``clamp`` clips the
    result to ``[-clamp, clamp]``. Shapes: ``[*]`` and ``[*]`` -> ``[*]``;
    differentiable w.r.t. both inputs.
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_same_shape("ref_logp", ref_logp, logp.shape, "logp")
    check_same_device("logp", logp, ref_logp=ref_logp)
    check_choice("estimator", estimator, reference.KL_ESTIMATORS)
    if clamp is not None:
        check_positive("clamp", clamp)
    return reference.kl_estimate(logp, ref_logp, estimator, clamp)


def kl_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact per-token ``KL(softmax(z) ‖ softmax(r))`` over the full vocabulary.

    ``KL = Σ_v p_v·(z_v - r_v) - lse_z + lse_r`` with ``z = logits / T``,
    ``r = ref_logits / T``; 0 where ``mask == 0``. Gradients:
    ``dz = p·(log p - log q - KL)``, ``dr = q - p`` (both ``/ T``).
    Shapes: ``[*, V]`` and ``[*, V]`` (+ ``mask[*]``) -> float32 ``[*]``.
    """
    check_logits("logits", logits)
    check_logits("ref_logits", ref_logits)
    check_same_shape("ref_logits", ref_logits, logits.shape, "logits")
    check_same_device("logits", logits, ref_logits=ref_logits, mask=mask)
    if mask is not None:
        check_tensor("mask", mask)
        check_same_shape("mask", mask, logits.shape[:-1], "logits.shape[:-1]")
    temperature = check_positive("temperature", temperature)
    return reference.kl_divergence(logits, ref_logits, temperature=temperature, mask=mask)
