"""Calls of every op that takes targets, with one target out of range (shared by the validation tests)."""

from typing import Callable, Optional, Tuple

import torch

import rlhf_kernels as rk

OPS_WITH_TARGETS = ["ppo_loss", "ppo_loss_grad", "linear_logprobs", "linear_cross_entropy"]


def call_with_bad_target(op: str, backend: Optional[str] = None) -> Tuple[Callable[[], object], str]:
    """``(call, where)``: ``call()`` runs ``op`` (``ppo_loss_grad``: on logits that require grad) with target
    ``V + 3 = 13`` at one position of a ``V = 10`` vocabulary; ``where`` is the regex of that position and value
    in the error."""
    B, T, V, H = 2, 3, 10, 4
    targets = torch.randint(0, V, (B, T))
    targets[1, 1] = V + 3
    ones = torch.ones(B, T)
    if op.startswith("ppo_loss"):
        logits = torch.randn(B, T, V, requires_grad=op.endswith("grad"))
        return lambda: rk.ppo_loss(logits, targets, ones * -2.3, ones, ones, backend=backend), r"targets\[1, 1\] = 13"
    hidden = torch.randn(B * T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    fn = getattr(rk, op)
    return lambda: fn(hidden, weight, targets.reshape(-1), backend=backend), r"targets\[4\] = 13"
