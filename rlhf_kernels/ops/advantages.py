"""Advantage estimation: GAE as one reverse-scan kernel instead of a Python time loop."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._checks import FLOAT_DTYPES, check_number, check_same_device, check_same_shape, check_tensor
from .logprobs import resolve_for

# CUDA tensors try Triton first, then the CUDA C++ kernel (ops/_dispatch.py order).
IMPLEMENTED = ("triton", "cpu", "cuda")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (no gradient).

    ``δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t``; ``A_t = δ_t + γλ·A_{t+1}·m_{t+1}``;
    ``returns = A + V``; both 0 where ``mask == 0``.

    Shapes: ``rewards, values, mask: [B, T]`` -> ``(advantages, returns)``, ``[B, T]``
    in ``values``' dtype.

    Backends: ``"triton"`` (CUDA default; one program per block of sequences,
    fp32 scan; float64 values skip it), ``"cuda"`` / ``"cpu"`` (C++ kernels),
    ``"torch"`` (the reference loop).
    """
    check_tensor("values", values, FLOAT_DTYPES)
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    check_tensor("mask", mask)
    if values.dim() != 2:
        raise ValueError(f"values must have shape [B, T], got {tuple(values.shape)}")
    check_same_shape("rewards", rewards, values.shape, "values")
    check_same_shape("mask", mask, values.shape, "values")
    check_same_device("values", values, rewards=rewards, mask=mask)
    gamma = check_number("gamma", gamma, low=0.0, high=1.0)
    lam = check_number("lam", lam, low=0.0, high=1.0)
    chosen = resolve_for("gae", values, backend, IMPLEMENTED)
    with torch.no_grad():
        if chosen == "triton":
            from ..triton.advantages import gae_fwd

            return gae_fwd(rewards, values, mask, float(gamma), float(lam))
        if chosen in ("cpu", "cuda"):
            return tuple(torch.ops.rlhf_kernels_C.gae(rewards, values, mask, float(gamma), float(lam)))
        return reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
