"""DESIGN.md §5's accuracy rule, shared by the op tests.

A fast backend passes when its error against the float64 oracle is at most
twice the error of the reference run in the input dtype, with a floor of
1e-5 (fp32) or 1e-2 (bf16 / fp16) relative to the oracle's magnitude.
"""

from __future__ import annotations

import torch

FLOORS = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_matches_oracle(fast: torch.Tensor, reference_in_dtype: torch.Tensor, oracle: torch.Tensor, dtype, what=""):
    """Checks ``fast`` against the float64 ``oracle`` under the 2x-reference-error rule.

    Non-finite oracle entries must be matched exactly in kind (NaN where NaN, same
    infinities); finite entries are compared with the rule above.
    """
    fast = fast.detach().double().cpu()
    ref = reference_in_dtype.detach().double().cpu()
    oracle = oracle.detach().double().cpu()
    assert fast.shape == oracle.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(oracle.shape)}"
    finite = torch.isfinite(oracle)
    assert torch.equal(torch.isnan(fast[~finite]), torch.isnan(oracle[~finite])), f"{what}: NaN pattern differs"
    assert torch.equal(fast[~finite & ~torch.isnan(oracle)], oracle[~finite & ~torch.isnan(oracle)]), (
        f"{what}: infinities differ"
    )
    assert torch.isfinite(fast[finite]).all(), f"{what}: non-finite values where the oracle is finite"
    if not finite.any():
        return
    err_fast = (fast[finite] - oracle[finite]).abs().max().item()
    err_ref = (ref[finite] - oracle[finite]).abs().max().item()
    scale = max(1.0, oracle[finite].abs().max().item())
    bound = max(2.0 * err_ref, FLOORS[dtype] * scale)
    assert err_fast <= bound, f"{what}: error {err_fast:.3e} > bound {bound:.3e} (reference error {err_ref:.3e})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled tensor like ``t`` (to prove a kernel wrote every element)."""
    return torch.full_like(t, float("nan"))
