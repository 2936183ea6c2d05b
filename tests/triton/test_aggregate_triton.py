"""``triton/aggregate.py``: the fused PPO step's weights, loss and logged means against ``aggregation_weights`` and
the float64 oracle (``reference.aggregate_loss``, masked token means), as the CUDA sums kernel's emulation test."""

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops import ppo as ppo_ops
from rlhf_kernels.triton.aggregate import loss_sums, loss_weights
from triton_testutils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (inf·0 in the branch a where discards)


def _case(rows, cols, kind, seed):
    g = torch.Generator().manual_seed(seed)
    mask = {
        "binary": lambda: (torch.rand(rows, cols, generator=g) < 0.7).float(),
        "empty": lambda: torch.zeros(rows, cols),
        "fractional": lambda: torch.rand(rows, cols, generator=g),
        # rows summing to zero, negative and positive rows (the weights' divide-or-zero and the non-empty count)
        "signed": lambda: torch.randn(rows, cols, generator=g).round() * torch.tensor([0.0, 1.0, -1.0]).repeat(
            rows // 3 + 1)[:rows, None],
    }[kind]()
    if kind == "binary" and rows > 1:
        mask[0] = 0.0  # an empty row among full ones
    term, logp = torch.randn(rows, cols, generator=g), -torch.rand(rows, cols, generator=g) * 5
    old_logp = logp + 0.1 * torch.randn(rows, cols, generator=g)
    clipped = (torch.rand(rows, cols, generator=g) < 0.3).float()
    return mask, term, clipped, logp, old_logp


def _oracle(mask, term, clipped, logp, old_logp, loss_agg):
    m64 = mask.double()
    loss = (reference.aggregate_loss(term.double(), m64, loss_agg) if m64.numel()
            else torch.zeros((), dtype=torch.float64))
    d = torch.where(m64 != 0, logp.double() - old_logp.double(), 0.0)
    count = m64.sum()
    means = torch.stack([reference.masked(clipped.double(), m64).sum(), (m64 * 0.5 * d * d).sum()])
    return loss, (means / count if count != 0 else torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("rows,cols", ((1, 1), (3, 5), (4, 37), (40, 7), (300, 5), (2, 1500), (0, 5), (5, 0)))
@pytest.mark.parametrize("kind", ("binary", "empty", "fractional", "signed"))
def test_weights_loss_and_means_match_the_oracle(loss_agg, rows, cols, kind):
    """Every loss_agg; rows longer than a 1024-wide tile (1500), short rows over several row tiles (300 x 5), empty
    and signed masks: the weights are ``aggregation_weights``' (the same bits for 0/1 masks, whose sums are exact),
    the loss and the token means the float64 oracle's; an empty mask gives exactly 0."""
    mask, term, clipped, logp, old_logp = (t.to(DEVICE) for t in _case(rows, cols, kind, seed=rows * 1000 + cols))
    weights, total = loss_weights(mask, loss_agg)
    expected = ppo_ops.aggregation_weights(mask, loss_agg)
    if kind in ("binary", "empty"):
        assert torch.equal(weights, expected), loss_agg
    else:
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    loss, means = loss_sums(weights, mask, total, term, clipped, logp, old_logp)
    loss64, means64 = _oracle(*(t.cpu() for t in (mask, term, clipped, logp, old_logp)), loss_agg)
    scale = max(1.0, float(mask.abs().sum()))  # signed masks: sums of cancelling terms
    torch.testing.assert_close(loss.cpu().double(), loss64, rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(means.cpu().double(), means64, rtol=1e-5, atol=1e-6 * scale)
    if kind == "empty":
        assert loss.item() == 0.0 and means.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", (torch.bool, torch.int64, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
def test_mask_dtypes_and_masked_non_finite_tokens(dtype, loss_agg):
    """A bool / integer / 16-bit mask gives the float mask's results; tokens of mask 0 whose term and log-prob are
    +-inf or NaN add nothing to the loss or the means (``reference.masked``)."""
    mask, term, clipped, logp, old_logp = _case(6, 9, "binary", seed=3)
    off = mask == 0
    bad = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(term.numel())[:term.numel()].view_as(term)
    term, logp = torch.where(off, bad, term), torch.where(off, bad.flip(0), logp)
    args = [t.to(DEVICE) for t in (term, clipped, logp, old_logp)]
    typed = mask.to(dtype).to(DEVICE)
    weights, total = loss_weights(typed, loss_agg)
    assert torch.equal(weights.cpu(), ppo_ops.aggregation_weights(mask, loss_agg))
    loss, means = loss_sums(weights, typed, total, *args)
    loss64, means64 = _oracle(mask, term, clipped, logp, old_logp, loss_agg)
    assert torch.isfinite(loss64) and torch.isfinite(loss) and torch.isfinite(means).all()
    torch.testing.assert_close(loss.cpu().double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.cpu().double(), means64, rtol=1e-5, atol=1e-6)


def test_a_mask_that_is_not_two_dimensional_or_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        loss_weights(torch.ones(3, device=DEVICE), "token-mean")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        loss_weights(torch.ones(2, 3, device=DEVICE), "sum")
