"""Shared helpers of the Triton tests (DESIGN.md §5 comparison rule, devices, poisoning)."""

from __future__ import annotations

import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Small tests run where Triton runs: CPU tensors under the interpreter, else the GPU.
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def floor_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2


def assert_rule(name: str, out: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> None:
    """DESIGN.md §5: ``err(out) <= max(2·err(ref in dtype), floor·max|ref64|)`` vs the float64 oracle.

    Non-finite oracle entries must be matched exactly (NaN where NaN, ±inf where ±inf);
    a NaN anywhere else (e.g. a poisoned element never written) fails.
    """
    out, ref_lowp, ref64 = (t.detach().double().cpu() for t in (out, ref_lowp, ref64))
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(out), torch.isnan(ref64)), f"{name}: NaN pattern differs from the oracle"
    assert torch.equal(out[~finite & ~torch.isnan(ref64)], ref64[~finite & ~torch.isnan(ref64)]), f"{name}: inf differs"
    if not finite.any():
        return
    assert torch.isfinite(out[finite]).all(), f"{name}: non-finite values where the oracle is finite"
    err = (out - ref64)[finite].abs().max().item()
    lowp_diff = (ref_lowp - ref64)[finite].abs()
    err_ref = lowp_diff[torch.isfinite(lowp_diff)].max().item() if torch.isfinite(lowp_diff).any() else 0.0
    scale = ref64[finite].abs().max().item()
    tol = max(2.0 * err_ref, floor_for(dtype) * max(scale, 1e-6))
    assert err <= tol, f"{name}: error {err:.3e} > tol {tol:.3e} (reference-in-dtype error {err_ref:.3e}, scale {scale:.3e})"


@contextlib.contextmanager
def poisoned_outputs():
    """Every Triton launcher output starts as NaN: a missed write shows up as NaN."""
    from rlhf_kernels.triton import _common

    old = _common.POISON_OUTPUTS
    _common.POISON_OUTPUTS = True
    try:
        yield
    finally:
        _common.POISON_OUTPUTS = old


def make_logits(shape, dtype, *, seed: int, scale: float = 3.0, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype).to(device)


def make_targets(shape, vocab: int, *, seed: int, ignore_frac: float = 0.2, ignore_index: int = -100, device=DEVICE):
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, vocab, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = ignore_index
    return y.to(device)
