"""Cases and the float64 oracle of the fused PPO step's loss aggregation (the weights before the kernel, the loss and
the logged means after it), shared by the CUDA kernels' CPU emulation test and the Triton kernels' test."""

from __future__ import annotations

import torch

from rlhf_kernels import reference

KINDS = ("binary", "empty", "fractional", "signed")


def aggregate_case(rows: int, cols: int, kind: str, seed: int):
    """``(mask, term, clipped, logp, old_logp)``, float32 ``[rows, cols]``; ``kind`` of mask: 0/1 with an empty row,
    empty, fractional weights, or signed (rows summing to zero, negative and positive rows: the weights'
    divide-or-zero and the non-empty count)."""
    g = torch.Generator().manual_seed(seed)
    mask = {
        "binary": lambda: (torch.rand(rows, cols, generator=g) < 0.7).float(),
        "empty": lambda: torch.zeros(rows, cols),
        "fractional": lambda: torch.rand(rows, cols, generator=g),
        "signed": lambda: torch.randn(rows, cols, generator=g).round() * torch.tensor([0.0, 1.0, -1.0]).repeat(
            rows // 3 + 1)[:rows, None],
    }[kind]()
    if kind == "binary" and rows > 1:
        mask[0] = 0.0  # an empty row among full ones
    term, logp = torch.randn(rows, cols, generator=g), -torch.rand(rows, cols, generator=g) * 5
    old_logp = logp + 0.1 * torch.randn(rows, cols, generator=g)
    clipped = (torch.rand(rows, cols, generator=g) < 0.3).float()
    return mask, term, clipped, logp, old_logp


def with_masked_non_finite(mask, term, logp):
    """``(term, logp)`` with +-inf and NaN at the tokens of mask 0 (padding, a masked vocabulary entry as target)."""
    off = mask == 0
    bad = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(term.numel())[:term.numel()].view_as(term)
    return torch.where(off, bad, term), torch.where(off, bad.flip(0), logp)


def aggregate_oracle(mask, term, clipped, logp, old_logp, loss_agg: str):
    """``(loss, [clip_frac, approx_kl])`` in float64: ``reference.aggregate_loss`` and the token means over the mask
    (0 for an empty mask), tokens of mask 0 adding nothing."""
    m64 = mask.double()
    loss = (reference.aggregate_loss(term.double(), m64, loss_agg) if m64.numel()
            else torch.zeros((), dtype=torch.float64))
    d = torch.where(m64 != 0, logp.double() - old_logp.double(), 0.0)
    count = m64.sum()
    means = torch.stack([reference.masked(clipped.double(), m64).sum(), (m64 * 0.5 * d * d).sum()])
    return loss, (means / count if count != 0 else torch.zeros(2, dtype=torch.float64))
