"""verl drop-ins vs verl 0.9.1's published formulas, written out independently here.

verl itself is not installed in CI (``pip install verl --no-deps`` does not
import on CPU without ray & co.), so the formulas below are transcriptions of
``verl.utils.torch_functional`` and ``verl.trainer.ppo.core_algos``
(``agg_loss``, ``compute_policy_loss``) at verl 0.9.1.
"""

from types import SimpleNamespace

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.integrations import verl as rk_verl

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum"]


# ----------------------------------------------------------------------------- verl 0.9.1, transcribed


def verl_masked_sum(values, mask):
    return torch.where(mask.bool(), values, torch.zeros_like(values)).mul(mask).sum()


def verl_masked_mean(values, mask):
    return verl_masked_sum(values, mask) / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return verl_masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if mode == "token-sum":
        return verl_masked_sum(loss_mat, loss_mask) * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if mode == "seq-mean-token-mean":
        seq_count = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_count + 1e-8)
        seq_mask = (seq_count > 0).float()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        return verl_masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    raise ValueError(mode)


def verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                             cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean", weights=None, **agg):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = verl_masked_mean(-negative_approx_kl, response_mask)
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = verl_masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    lower = torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float()
    pg_clipfrac_lower = verl_masked_mean(lower, response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if weights is not None:
        pg_losses = pg_losses * weights
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **agg)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


# ----------------------------------------------------------------------------- inputs


def _batch(seed, B=6, T=9, empty_rows=(), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    new = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 1.0  # many ratios outside [0.8, 1.28]
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    new[0, 0], adv[0, 0] = old[0, 0] + 2.0, -1.0  # ratio e^2 > c with A < 0: the dual clip is active
    for row in empty_rows:
        mask[row] = 0
    return old.to(dtype), new.to(dtype), adv.to(dtype), mask


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("empty_rows", [(), (1, 4)])
def test_agg_loss_matches_verl(mode, empty_rows):
    _, new, _, mask = _batch(1, empty_rows=empty_rows)
    ours = rk_verl.agg_loss(new, mask, mode)
    theirs = verl_agg_loss(new, mask, mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    poisoned = new.masked_fill(mask == 0, float("nan"))  # outside the mask nothing may leak (verl: NaN in seq modes)
    torch.testing.assert_close(rk_verl.agg_loss(poisoned, mask, mode), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_global_batch_arguments(mode):
    _, new, _, mask = _batch(2, empty_rows=(0,))
    kw = dict(dp_size=4, batch_num_tokens=123.0, global_batch_size=17, loss_scale_factor=64)
    torch.testing.assert_close(rk_verl.agg_loss(new, mask, mode, **kw), verl_agg_loss(new, mask, mode, **kw))
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        rk_verl.agg_loss(new, mask, "seq-sum")


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_at_the_edges_of_its_global_arguments(mode):
    """A sequence of one token counts as a sequence; a global batch of one sequence (or one token) divides by 1; with
    two data-parallel ranks the global count is required, as verl asserts."""
    _, new, _, mask = _batch(5, empty_rows=(0,))
    mask[2, 1:] = 0   # a response of one token is not empty
    torch.testing.assert_close(rk_verl.agg_loss(new, mask, mode), verl_agg_loss(new, mask, mode))
    kw = dict(dp_size=1, batch_num_tokens=1.0, global_batch_size=1)
    torch.testing.assert_close(rk_verl.agg_loss(new, mask, mode, **kw), verl_agg_loss(new, mask, mode, **kw))
    if mode != "token-sum":
        with pytest.raises(ValueError, match="batch_num_tokens" if mode == "token-mean" else "global_batch_size"):
            rk_verl.agg_loss(new, mask, mode, dp_size=2)


@pytest.mark.parametrize("mode", MODES[:4])
def test_loss_agg_mode_names_map_to_rk(mode):
    """The documented mapping: verl's names are rk.aggregate_loss's, equal when no sequence is empty."""
    _, new, _, mask = _batch(3)
    torch.testing.assert_close(rk.aggregate_loss(new, mask, mode), verl_agg_loss(new, mask, mode))


def test_empty_mask_gives_zero_not_nan():
    _, new, _, mask = _batch(4)
    mask.zero_()
    for mode in MODES:
        assert rk_verl.agg_loss(new, mask, mode).item() == 0.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, None, None, 3.0), (None, 0.2, 0.28, 3.0), (0.1, None, 0.3, 1.5)])
def test_compute_policy_loss_matches_verl(mode, clips):
    cliprange, low, high, c = clips
    old, new, adv, mask = _batch(5, empty_rows=(2,) if mode != "token-mean" else ())
    kw = dict(cliprange=cliprange, cliprange_low=low, cliprange_high=high, clip_ratio_c=c, loss_agg_mode=mode)
    x_ours = new.clone().requires_grad_(True)
    x_theirs = new.clone().requires_grad_(True)
    ours = rk_verl.compute_policy_loss(old, x_ours, adv, mask, **kw)
    theirs = verl_compute_policy_loss(old, x_theirs, adv, mask, **kw)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert 0 < theirs[1] < 1 and 0 < theirs[3] < 1  # both clip branches and the dual clip are exercised
    ours[0].backward()
    theirs[0].backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-6, atol=1e-8)
    assert x_ours.grad.abs().sum() > 0


def test_compute_policy_loss_clamps_the_log_ratio_at_20():
    """Log-ratios past ±20 (a token whose probability collapsed or exploded) count as ±20, in the loss and in
    ppo_kl, as in verl."""
    old, new, adv, mask = _batch(11)
    new[1, 0], new[2, 0], adv[1, 0], adv[2, 0] = old[1, 0] + 25.0, old[2, 0] - 30.0, -0.5, 0.7
    ours = rk_verl.compute_policy_loss(old, new, adv, mask, cliprange=0.2)
    theirs = verl_compute_policy_loss(old, new, adv, mask, cliprange=0.2)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compute_policy_loss_float32_and_validation():
    old, new, adv, mask = _batch(6, dtype=torch.float32)
    ours = rk_verl.compute_policy_loss(old, new, adv, mask, cliprange=0.2)
    theirs = verl_compute_policy_loss(old, new, adv, mask, cliprange=0.2)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        rk_verl.compute_policy_loss(old, new, adv, mask, cliprange=0.2, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="cliprange"):
        rk_verl.compute_policy_loss(old, new, adv, mask)
    with pytest.raises(ValueError, match="cliprange"):
        rk_verl.compute_policy_loss(old, new, adv, mask, cliprange_low=0.2)   # no upper bound
    with pytest.raises(ValueError, match="advantages"):
        rk_verl.compute_policy_loss(old, new, adv[:, :3], mask, cliprange=0.2)


@pytest.mark.parametrize("as_dict", [True, False])
def test_compute_policy_loss_vanilla_config(as_dict):
    old, new, adv, mask = _batch(7, empty_rows=(3,))
    g = torch.Generator().manual_seed(8)
    weights = torch.rand(new.shape, generator=g, dtype=new.dtype) + 0.5
    info = dict(dp_size=2, batch_num_tokens=40, global_batch_size=9, loss_scale_factor=None)
    fields = dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=2.5, global_batch_info=info)
    config = fields if as_dict else SimpleNamespace(**fields)
    x = new.clone().requires_grad_(True)
    loss, metrics = rk_verl.compute_policy_loss_vanilla(
        old, x, adv, mask, loss_agg_mode="seq-mean-token-sum-norm", config=config, rollout_is_weights=weights
    )
    ref = verl_compute_policy_loss(
        old, new, adv, mask, cliprange=0.2, cliprange_high=0.28, clip_ratio_c=2.5,
        loss_agg_mode="seq-mean-token-sum-norm", weights=weights, **info
    )
    torch.testing.assert_close(loss, ref[0])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(ref[1].item())
    assert metrics["actor/ppo_kl"] == pytest.approx(ref[2].item())
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(ref[3].item())
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 11), (1, 1, 1), (3, 4, 50257)])
def test_logprobs_from_logits(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(shape, generator=g) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    upstream = torch.randn(shape[:-1], generator=g)
    x = logits.clone().requires_grad_(True)
    out = rk_verl.logprobs_from_logits(x, labels, inplace_backward=True)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    (out * upstream).sum().backward()
    y = logits.double().requires_grad_(True)
    ref = torch.log_softmax(y, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # logprobs_from_logits_naive
    (ref * upstream.double()).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # reduced in fp32 from exact inputs
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), y.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_from_logits(dtype):
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 7, 301, generator=g) * 2).to(dtype)
    x = logits.clone().requires_grad_(True)
    ours = rk_verl.entropy_from_logits(x)
    chunked = rk_verl.entropy_from_logits_with_chunking(logits, chunk_size=4)
    assert ours.dtype == dtype and ours.shape == (3, 7)
    ours.float().sum().backward()
    y = logits.double().requires_grad_(True)
    pd = torch.softmax(y, -1)
    ref = torch.logsumexp(y, -1) - (pd * y).sum(-1)  # verl's formula
    ref.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(ours.double(), ref, **tol)
    torch.testing.assert_close(chunked, ours.detach())
    grad_tol = tol if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(x.grad.double(), y.grad, **grad_tol)


def test_entropy_of_a_single_row_and_the_smallest_chunk():
    logits = torch.randn(11, generator=torch.Generator().manual_seed(10), dtype=torch.float64).float()
    y = logits.double()
    want = torch.logsumexp(y, -1) - (torch.softmax(y, -1) * y).sum(-1)
    ours = rk_verl.entropy_from_logits(logits)
    assert ours.shape == ()
    torch.testing.assert_close(ours.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rk_verl.entropy_from_logits_with_chunking(logits, chunk_size=1), ours)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        rk_verl.entropy_from_logits_with_chunking(logits, chunk_size=0)


def test_torch_compile_fullgraph():
    """verl wraps entropy_from_logits in torch.compile(dynamic=True): the drop-ins must trace without graph breaks."""
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 5, 33, generator=g)
    labels = torch.randint(0, 33, (2, 5), generator=g)
    entropy = torch.compile(rk_verl.entropy_from_logits, backend="aot_eager", fullgraph=True, dynamic=True)
    logprobs = torch.compile(rk_verl.logprobs_from_logits, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_(True)
    (entropy(x).sum() + logprobs(x, labels).sum()).backward()
    y = logits.clone().requires_grad_(True)
    (rk_verl.entropy_from_logits(y).sum() + rk_verl.logprobs_from_logits(y, labels).sum()).backward()
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(entropy(logits), rk_verl.entropy_from_logits(logits))


def test_a_bad_labels_tensor_is_reported_as_labels():
    """verl's argument is ``labels``: a bad one is named so, not as the fused op's ``targets``."""
    logits = torch.randn(2, 5, 11)
    with pytest.raises(TypeError, match="^labels must have dtype"):
        rk_verl.logprobs_from_logits(logits, torch.rand(2, 5))
    with pytest.raises(ValueError, match="^labels must have shape"):
        rk_verl.logprobs_from_logits(logits, torch.randint(0, 11, (2, 4)))
