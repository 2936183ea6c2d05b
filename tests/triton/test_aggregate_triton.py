"""``triton/aggregate.py``: the fused PPO step's weights, loss and logged means against ``aggregation_weights`` and
the float64 oracle (``reference.aggregate_loss``, masked token means), as the CUDA sums kernel's emulation test."""

import pytest
import torch

from rlhf_kernels import reference
from rlhf_kernels.ops import ppo as ppo_ops
from rlhf_kernels.triton.aggregate import loss_sums, loss_weights
from tests.aggregate_cases import KINDS, aggregate_case, aggregate_oracle, with_masked_non_finite
from triton_testutils import DEVICE

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # (inf·0 in the branch a where discards)


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("rows,cols", ((1, 1), (3, 5), (4, 37), (40, 7), (300, 5), (2, 1500), (0, 5), (5, 0)))
@pytest.mark.parametrize("kind", KINDS)
def test_weights_loss_and_means_match_the_oracle(loss_agg, rows, cols, kind):
    """Every loss_agg; rows longer than a 1024-wide tile (1500), short rows over several row tiles (300 x 5), empty
    and signed masks: the weights are ``aggregation_weights``' (the same bits for 0/1 masks, whose sums are exact),
    the loss and the token means the float64 oracle's; an empty mask gives exactly 0."""
    case = aggregate_case(rows, cols, kind, seed=rows * 1000 + cols)
    mask, term, clipped, logp, old_logp = (t.to(DEVICE) for t in case)
    weights, total = loss_weights(mask, loss_agg)
    expected = ppo_ops.aggregation_weights(mask, loss_agg)
    if kind in ("binary", "empty"):
        assert torch.equal(weights, expected), loss_agg
    else:
        torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-7)
    loss, means = loss_sums(weights, mask, total, term, clipped, logp, old_logp)
    loss64, means64 = aggregate_oracle(*(t.cpu() for t in (mask, term, clipped, logp, old_logp)), loss_agg)
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
    mask, term, clipped, logp, old_logp = aggregate_case(6, 9, "binary", seed=3)
    term, logp = with_masked_non_finite(mask, term, logp)
    args = [t.to(DEVICE) for t in (term, clipped, logp, old_logp)]
    typed = mask.to(dtype).to(DEVICE)
    weights, total = loss_weights(typed, loss_agg)
    assert torch.equal(weights.cpu(), ppo_ops.aggregation_weights(mask, loss_agg))
    loss, means = loss_sums(weights, typed, total, *args)
    loss64, means64 = aggregate_oracle(mask, term, clipped, logp, old_logp, loss_agg)
    assert torch.isfinite(loss64) and torch.isfinite(loss) and torch.isfinite(means).all()
    torch.testing.assert_close(loss.cpu().double(), loss64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means.cpu().double(), means64, rtol=1e-5, atol=1e-6)


def test_a_mask_that_is_not_two_dimensional_or_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        loss_weights(torch.ones(3, device=DEVICE), "token-mean")
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        loss_weights(torch.ones(2, 3, device=DEVICE), "sum")
