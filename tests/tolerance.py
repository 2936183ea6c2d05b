"""DESIGN.md §5's accuracy rule, shared by the op tests.

A fast backend passes when its error against the float64 oracle is at most
twice the error of the reference run in the input dtype, with a floor of
1e-5 (fp32) or 1e-2 (bf16 / fp16) relative to the oracle's magnitude.
"""

from __future__ import annotations

import torch

FLOORS = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _compared(fast: torch.Tensor, reference_in_dtype: torch.Tensor, oracle: torch.Tensor, what: str):
    """The three as float64 CPU tensors of one shape, with NaN where the oracle has NaN, its infinities exactly and
    finite values elsewhere; returns ``(fast, reference_in_dtype, oracle, where the oracle is finite)``."""
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
    return fast, ref, oracle, finite


def assert_matches_oracle(fast: torch.Tensor, reference_in_dtype: torch.Tensor, oracle: torch.Tensor, dtype, what="",
                          *, allowance: torch.Tensor = None):
    """Checks ``fast`` against the float64 ``oracle`` under the 2x-reference-error rule.

    Non-finite oracle entries must be matched exactly in kind (NaN where NaN, same
    infinities); finite entries are compared with the rule above. ``allowance``
    (shaped like ``fast``) is an error each element may have beyond that bound, for
    outputs whose error the rule cannot see coming: a GEMM over an operand rounded to
    the dtype (a gradient of the logits before the matmul with the LM head) carries
    a few ulps of its terms' sum, which cancellation can leave large next to the sum.
    """
    fast, ref, oracle, finite = _compared(fast, reference_in_dtype, oracle, what)
    if not finite.any():
        return
    err_fast = (fast[finite] - oracle[finite]).abs().max().item()
    err_ref = (ref[finite] - oracle[finite]).abs().max().item()
    scale = max(1.0, oracle[finite].abs().max().item())
    bound = max(2.0 * err_ref, FLOORS[dtype] * scale)
    if allowance is not None and err_fast > bound:
        excess = (fast[finite] - oracle[finite]).abs() - torch.clamp_min(allowance.detach().double().cpu()[finite],
                                                                        bound)
        assert excess.max().item() <= 0, f"{what}: error beyond {bound:.3e} and its allowance"
        return
    assert err_fast <= bound, f"{what}: error {err_fast:.3e} > bound {bound:.3e} (reference error {err_ref:.3e})"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled tensor like ``t`` (to prove a kernel wrote every element)."""
    return torch.full_like(t, float("nan"))


def float32_lse_error(z_absmax: torch.Tensor) -> torch.Tensor:
    """Relative error a float32 gradient row may carry from its one stored float32 lse: ``16·2^-24·max|z|``
    (``assert_rows_match_oracle``). A row of logits as large as 1e4 holds its lse to ~1e4·2^-24 = 6e-4, and every
    backend keeps one float32 lse per row for the backward, so ``p = exp(z - lse)`` carries that error there."""
    return 16.0 * 2.0**-24 * z_absmax


def assert_rows_match_oracle(fast, reference_in_dtype, oracle, dtype, what="", *, vocab_last=False, z_absmax=None,
                             allowance=None):
    """DESIGN.md §5's rule applied to each row on its own: each ``[..., V]`` row of a gradient (``vocab_last``),
    else each element (a per-token output).

    Stricter than :func:`assert_matches_oracle`, whose floor scales with the largest value of the whole tensor, so
    that a row of logits of size 1e4 (whose log-probs are ~1e4) cannot hide the error of a row of ordinary ones.

    ``z_absmax`` (per row, ``max |logits / T|`` over its finite entries) raises a float32 row's floor to
    ``16·2^-24·z_absmax`` of its scale: the backward rebuilds ``p = exp(z - lse)`` from one stored float32 lse,
    whose rounding (``ulp(lse) / 2``, which is not small next to 1 once ``|z| >> 1``) is the error of a
    backward-stable float32 algorithm there; the KL's ``(log p - log q - KL) / T`` sums three such roundings,
    each of a term up to ``2·z_absmax``, before the division. The forward values get no such allowance.

    ``allowance`` (shaped like ``fast``): an error each element may have on top of its row's bound, for a rounding
    the rule cannot see coming (``interpreter_bf16_allowance``).
    """
    fast, ref, oracle, finite = _compared(fast, reference_in_dtype, oracle, what)
    width = fast.shape[-1] if vocab_last else 1

    def rows(t):
        return t.reshape(-1, width)

    keep = rows(finite)
    zero = torch.zeros((), dtype=torch.float64)
    diff = (rows(fast) - rows(oracle)).abs()
    if allowance is not None:
        diff = (diff - rows(allowance.detach().double().cpu())).clamp_min(0.0)
    err_fast = torch.where(keep, diff, zero).amax(-1)
    ref_diff = (rows(ref) - rows(oracle)).abs()
    err_ref = torch.where(keep & torch.isfinite(ref_diff), ref_diff, zero).amax(-1)
    scale = torch.where(keep, rows(oracle).abs(), zero).amax(-1).clamp_min(1.0)
    floor = torch.full_like(scale, FLOORS[dtype])
    if z_absmax is not None and dtype == torch.float32:
        floor = torch.maximum(floor, float32_lse_error(z_absmax.detach().double().cpu().reshape(-1)))
    bound = torch.maximum(2.0 * err_ref, floor * scale)
    bad = err_fast > bound
    if bad.any():
        r = int(torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: row {r} error {err_fast[r].item():.3e} > bound {bound[r].item():.3e} (reference error "
            f"{err_ref[r].item():.3e}, scale {scale[r].item():.3e}); {int(bad.sum())} of {bad.numel()} rows fail"
        )


def interpreter_bf16_allowance(oracle: torch.Tensor) -> torch.Tensor:
    """One bfloat16 ulp of each value (``2^-7·|x|`` bounds it): Triton's interpreter converts float32 to bfloat16 by
    truncation (``_convert_float`` without a rounding mode), where a GPU rounds to nearest, so a bf16 output of a
    Triton kernel run on the CPU can be up to one ulp further from the oracle than the kernel's own rounding."""
    return torch.nan_to_num(oracle.detach().double().cpu().abs(), nan=0.0, posinf=0.0) * 2.0**-7
