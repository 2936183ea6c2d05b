"""Public API of the [B, T]-sized ops on the CPU: GAE kernel, KL, losses, aggregation — values and bad input."""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.clip_regimes import LOG_RATIOS, old_logp_and_advantages
from tests.tolerance import assert_matches_oracle

GAE_BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]
# the Triton kernels run on CPU tensors only under the interpreter
INTERPRETED_TRITON = triton_importable() and triton_interpreting()


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rewards_dtype", [torch.float32, "same"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_gae_of_16_bit_values(backend, values_dtype, rewards_dtype, mask_dtype):
    """16-bit values (a bf16 value head) come back in their dtype, scanned in float32 (the CPU kernel refused them
    with NotImplementedError, and the default CPU backend is that kernel); DESIGN §5's rule against the oracle."""
    torch.manual_seed(5)
    shape = (6, 129)
    values = (torch.randn(shape) * 3).to(values_dtype)
    rewards = torch.randn(shape).to(values_dtype if rewards_dtype == "same" else rewards_dtype)
    mask = (torch.arange(shape[1])[None] < torch.randint(0, shape[1] + 1, (shape[0], 1))).to(mask_dtype)
    adv, ret = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    assert adv.dtype == values_dtype and ret.dtype == values_dtype
    in_dtype = R.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    oracle = R.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    for name, fast, ref, exact in zip(("advantages", "returns"), (adv, ret), in_dtype, oracle):
        assert_matches_oracle(fast, ref, exact, values_dtype, f"{backend}/{name}")


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (64, 5)])
def test_gae_matches_oracle(backend, dtype, shape):
    torch.manual_seed(sum(shape))
    rewards, values = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    lengths = torch.randint(0, shape[1] + 1, (shape[0],))
    mask = (torch.arange(shape[1])[None] < lengths[:, None]).to(dtype)
    adv, ret = rk.gae(rewards, values, mask, gamma=0.99, lam=0.9, backend=backend)
    oracle_adv, oracle_ret = R.gae(rewards.double(), values.double(), mask.double(), gamma=0.99, lam=0.9)
    assert adv.dtype == dtype and ret.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(adv.double(), oracle_adv, atol=tol, rtol=tol)
    torch.testing.assert_close(ret.double(), oracle_ret, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
def test_gae_with_fractional_mask_weights(backend):
    """A mask of weights in [0, 1] scales the scan's carries and both outputs: returns = (A + V)·m from the unmasked
    A, as DESIGN §2 writes it and every kernel computes it (the oracle took (A·m + V)·m, which only 0 / 1 masks
    make equal)."""
    torch.manual_seed(9)
    rewards, values, mask = torch.randn(3, 40), torch.randn(3, 40), torch.rand(3, 40)
    adv, ret = rk.gae(rewards, values, mask, gamma=0.97, lam=0.9, backend=backend)
    # the unmasked scan with the weights as carries: A_t = δ_t + γλ·A_{t+1}·m_{t+1}, δ with γ·V_{t+1}·m_{t+1}
    a, nv, na, nm = torch.zeros(3, dtype=torch.float64), torch.zeros(3), torch.zeros(3), torch.zeros(3)
    expected_adv, expected_ret = torch.zeros(3, 40, dtype=torch.float64), torch.zeros(3, 40, dtype=torch.float64)
    for t in reversed(range(40)):
        r, v, m = rewards[:, t].double(), values[:, t].double(), mask[:, t].double()
        a = r + 0.97 * nv * nm - v + 0.97 * 0.9 * na * nm
        expected_adv[:, t], expected_ret[:, t] = a * m, (a + v) * m
        nv, na, nm = v, a, m
    torch.testing.assert_close(adv.double(), expected_adv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret.double(), expected_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", GAE_BACKENDS + (["triton"] if INTERPRETED_TRITON else []))
@pytest.mark.parametrize("mask_kind", ["padding", "prompt-and-padding", "holes", "weights"])
def test_gae_ignores_masked_steps_whatever_they_hold(backend, mask_kind):
    """Masked steps whose rewards and values are NaN or ±inf (padding filled with junk) change nothing: both outputs
    equal those of the same batch with finite padding, bit for bit, and are 0 at the masked steps. The literal
    ``γ·V_{t+1}·m_{t+1}`` made the step before a NaN-valued pad NaN (0·inf), and the scan carried it to the whole
    sequence."""
    g = torch.Generator().manual_seed(12)
    B, T = 4, 23
    steps = torch.arange(T)[None]
    ends = torch.tensor([[23], [15], [1], [9]])
    mask = {"padding": steps < ends, "prompt-and-padding": (steps >= 3) & (steps < ends),
            "holes": torch.rand(B, T, generator=g) < 0.7,
            "weights": torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) < 0.7)}[mask_kind].float()
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    junk = torch.tensor([float("nan"), float("inf"), float("-inf")])
    off = mask == 0
    spoiled_r = torch.where(off, junk[torch.randint(3, (B, T), generator=g)], rewards)
    spoiled_v = torch.where(off, junk[torch.randint(3, (B, T), generator=g)], values)
    clean = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95, backend=backend)
    spoiled = rk.gae(spoiled_r, spoiled_v, mask, gamma=0.99, lam=0.95, backend=backend)
    oracle = R.gae(spoiled_r.double(), spoiled_v.double(), mask, gamma=0.99, lam=0.95)
    for name, c, s_, o in zip(("advantages", "returns"), clean, spoiled, oracle):
        assert torch.isfinite(s_).all() and torch.isfinite(o).all(), name
        assert torch.equal(s_, c), f"{name}: junk in masked steps changed the result"
        assert (s_[off] == 0).all() and (o[off] == 0).all()
        torch.testing.assert_close(s_.double(), o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", GAE_BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_gae_of_no_sequences_or_no_steps_is_empty(backend, shape):
    x = torch.randn(shape)
    adv, ret = rk.gae(x, x, torch.ones(shape), backend=backend)
    assert adv.shape == shape and ret.shape == shape


def test_gae_bad_input():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"values must have shape \[B, T\]"):
        rk.gae(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="mask must have shape"):
        rk.gae(x, x, x[:, :2])
    with pytest.raises(ValueError, match="lam must be in"):
        rk.gae(x, x, x, lam=1.5)


def test_kl_ops_match_reference_and_check_arguments():
    torch.manual_seed(0)
    logits, ref = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = rk.kl_divergence(logits, ref, temperature=0.9, mask=mask)
    torch.testing.assert_close(
        got.double(), R.kl_divergence(logits.double(), ref.double(), temperature=0.9, mask=mask), atol=1e-5, rtol=1e-5
    )
    assert (got[mask == 0] == 0).all()
    with pytest.raises(ValueError, match="ref_logits must have shape"):
        rk.kl_divergence(logits, ref[:, :2])
    lp, rlp = torch.randn(5), torch.randn(5)
    for est in R.KL_ESTIMATORS:
        torch.testing.assert_close(rk.kl_estimate(lp, rlp, est), R.kl_estimate(lp, rlp, est))
    with pytest.raises(ValueError, match="estimator must be one of"):
        rk.kl_estimate(lp, rlp, "k4")
    with pytest.raises(ValueError, match="ref_logp must have shape"):
        rk.kl_estimate(lp, rlp[:3])


def test_losses_match_reference_and_check_arguments():
    torch.manual_seed(1)
    v, vo, ret = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    torch.testing.assert_close(rk.value_loss(v, vo, ret, mask), R.value_loss(v, vo, ret, mask))
    with pytest.raises(ValueError, match="returns must have shape"):
        rk.value_loss(v, vo, ret[:, :2], mask)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        rk.value_loss(v, vo, ret, mask, loss_agg="mean")
    rc, rr = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(rk.reward_model_loss(rc, rr, margin=0.1), R.reward_model_loss(rc, rr, margin=0.1))
    with pytest.raises(ValueError, match="r_rejected must have shape"):
        rk.reward_model_loss(rc, rr[:2])
    for loss_type in R.DPO_LOSS_TYPES:
        torch.testing.assert_close(
            rk.dpo_loss(rc, rr, rr, rc, loss_type=loss_type), R.dpo_loss(rc, rr, rr, rc, loss_type=loss_type)
        )
    with pytest.raises(ValueError, match="loss_type must be one of"):
        rk.dpo_loss(rc, rr, rr, rc, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        rk.dpo_loss(rc, rr, rr, rc, beta=0)


@pytest.mark.parametrize("clip", [0.2, None])
@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
def test_value_loss_ignores_masked_tokens_whatever_they_hold(clip, loss_agg):
    """Masked-out positions whose returns or old values are NaN or infinite (padding): the loss and the values'
    gradient are those of the same batch with harmless padding, the masked gradients exactly 0 (not 0·NaN)."""
    g = torch.Generator().manual_seed(9)
    v, vo, ret = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(3, 5, dtype=torch.float64)
    mask[0, 1] = mask[1, 3] = mask[2, 0] = 0.0
    bad_ret, bad_old = ret.clone(), vo.clone()
    bad_ret[0, 1], bad_old[1, 3], bad_ret[2, 0] = float("nan"), float("-inf"), float("inf")
    losses = []
    for old_values, returns in ((bad_old, bad_ret), (vo, ret)):
        leaf = v.clone().requires_grad_()
        loss = rk.value_loss(leaf, old_values, returns, mask, clip=clip, loss_agg=loss_agg)
        losses.append((loss, torch.autograd.grad(loss, leaf)[0]))
    (loss, grad), (expected, expected_grad) = losses
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)
    assert (grad[mask == 0] == 0).all()


@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
def test_aggregate_loss_empty_mask_is_zero(loss_agg):
    term = torch.randn(2, 3, requires_grad=True)
    loss = rk.aggregate_loss(term, torch.zeros(2, 3), loss_agg)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(term.grad).all()


def test_ppo_loss_on_cpu_matches_oracle_with_gradient():
    torch.manual_seed(2)
    B, T, V = 2, 5, 300
    logits = (torch.randn(B, T + 1, V) * 2).requires_grad_(True)
    targets = torch.randint(0, V, (B, T))
    old = R.logprobs(logits.detach()[:, :-1] + 0.3 * torch.randn(B, T, V), targets)
    ref = R.logprobs(logits.detach()[:, :-1] + 0.3 * torch.randn(B, T, V), targets)
    adv, mask = torch.randn(B, T), (torch.rand(B, T) > 0.2).float()
    kwargs = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
                  loss_agg="seq-mean-token-mean")
    out = rk.ppo_loss(logits[:, :-1], targets, old, adv, mask, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, logits)
    x64 = logits.detach().double().requires_grad_(True)
    oracle = R.ppo_loss(x64[:, :-1], targets, old.double(), adv.double(), mask.double(),
                        **{**kwargs, "ref_logp": ref.double()})
    (oracle_grad,) = torch.autograd.grad(oracle.loss, x64)
    torch.testing.assert_close(out.loss.double(), oracle.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), oracle_grad, atol=1e-6, rtol=1e-4)
    for name in ("logp", "entropy", "kl", "clip_frac", "approx_kl"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(oracle, name), atol=1e-5, rtol=1e-5)


def test_ppo_loss_bad_input():
    logits, targets = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages must have shape"):
        rk.ppo_loss(logits, targets, z, z[:, :1], z)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logp"):
        rk.ppo_loss(logits, targets, z, z, z, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        rk.ppo_loss(logits, targets, z, z, z, dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        rk.ppo_loss(logits, targets, z, z, z, loss_agg="sum")
    flat = torch.zeros(6)  # the per-sequence aggregations need a sequence dimension, and say so by name
    with pytest.raises(ValueError, match=r"loss_agg='seq-mean-token-mean' needs logits of shape \[B, T, V\]"):
        rk.ppo_loss(logits.reshape(6, 7), targets.reshape(6), flat, flat, flat, loss_agg="seq-mean-token-mean")
    with pytest.raises(ValueError, match=r"loss_agg='seq-mean-token-sum' needs hidden of shape \[B, T, H\]"):
        rk.linear_ppo_loss(torch.randn(6, 4), torch.randn(7, 4), targets.reshape(6), flat, flat, flat,
                           loss_agg="seq-mean-token-sum")


@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["random", "empty", "one-empty-row", "weights"])
def test_ppo_output_matches_the_reference_aggregation(loss_agg, mask_kind):
    """ops.ppo.ppo_output (shared count, stacked statistics: fewer GPU launches) against reference.aggregate_loss
    and reference.ppo_loss's masked means, gradient of the loss included; an empty mask gives 0 and a 0 gradient."""
    from rlhf_kernels.ops import ppo as ppo_ops

    g = torch.Generator().manual_seed(5)
    B, T = 3, 7
    term = torch.randn(B, T, dtype=torch.float64, generator=g).requires_grad_(True)
    logp = -torch.rand(B, T, dtype=torch.float64, generator=g) * 4
    old = logp + 0.3 * torch.randn(B, T, dtype=torch.float64, generator=g)
    clipped = torch.rand(B, T, generator=g) > 0.6
    mask = {"random": (torch.rand(B, T, generator=g) > 0.3).double(), "empty": torch.zeros(B, T, dtype=torch.float64),
            "one-empty-row": torch.ones(B, T, dtype=torch.float64).index_fill_(0, torch.tensor([1]), 0.0),
            "weights": torch.rand(B, T, dtype=torch.float64, generator=g)}[mask_kind]
    out = ppo_ops.ppo_output(term, logp, logp, logp, clipped, old, mask, loss_agg)
    expected = R.aggregate_loss(term, mask, loss_agg)
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, term)
    (expected_grad,) = torch.autograd.grad(expected, term)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)
    count = mask.sum()
    clip_frac = (clipped.double() * mask).sum() / count if count else torch.tensor(0.0, dtype=torch.float64)
    approx_kl = (0.5 * (logp - old) ** 2 * mask).sum() / count if count else torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(out.clip_frac, clip_frac, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.approx_kl, approx_kl, atol=1e-12, rtol=1e-12)
    if mask_kind == "empty":
        assert out.loss.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["random", "empty", "one-empty-row", "weights"])
def test_masked_tokens_with_non_finite_terms_add_nothing(loss_agg, mask_kind):
    """A token of mask 0 whose term is +-inf or NaN leaves every aggregation as it is without it (R.masked), in
    the oracle, ppo_output's fewer-launch path and the fused ops' Σ w·term; 0·inf had made the loss NaN (an empty
    mask included, which DESIGN §2 gives 0)."""
    from rlhf_kernels.ops import ppo as ppo_ops

    g = torch.Generator().manual_seed(6)
    B, T = 3, 7
    mask = {"random": (torch.rand(B, T, generator=g) > 0.3).double(), "empty": torch.zeros(B, T, dtype=torch.float64),
            "one-empty-row": torch.ones(B, T, dtype=torch.float64).index_fill_(0, torch.tensor([1]), 0.0),
            "weights": torch.rand(B, T, dtype=torch.float64, generator=g)}[mask_kind]
    if mask_kind == "weights":
        mask[mask < 0.3] = 0.0
    off = mask == 0
    finite = torch.randn(B, T, dtype=torch.float64, generator=g)
    bad = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=torch.float64).repeat(B * T)[:B * T]
    term = torch.where(off, bad.view(B, T), finite)
    logp = torch.where(off, bad.view(B, T).flip(0), -torch.rand(B, T, dtype=torch.float64, generator=g))
    old = logp.nan_to_num(0.0, 0.0, 0.0) - 0.1
    clipped = torch.rand(B, T, generator=g) > 0.6
    expected = R.aggregate_loss(finite * (~off), mask, loss_agg)  # the same batch with harmless masked terms
    assert torch.isfinite(expected)
    assert torch.equal(R.aggregate_loss(term, mask, loss_agg), expected)
    out = ppo_ops.ppo_output(term, logp, logp, logp, clipped, old, mask, loss_agg)
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(out.clip_frac) and torch.isfinite(out.approx_kl)
    weights = ppo_ops.aggregation_weights(mask, loss_agg).double()
    loss, means = ppo_ops._fused_loss_and_means(term, clipped.double(), logp, old, weights, mask, loss_agg)
    torch.testing.assert_close(loss, expected, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(means, torch.stack((out.clip_frac, out.approx_kl)), atol=1e-7, rtol=1e-6)


def _ppo_backends():
    # ("torch", "fused-op" / "two-pass-op"): the PyTorch twins of the CUDA backend's two routes, called as ops
    cases = [("torch", None), ("torch", "fused-op"), ("torch", "two-pass-op")]
    cases += [("cpu", None)] if _ext.available() else []
    if INTERPRETED_TRITON:
        cases += [("triton", "fused"), ("triton", "two-pass")]
    return cases


def _ppo_loss_by_op(route, logits, y, old, adv, mask, ref, *, kl_coef, kl_estimator, entropy_coef, loss_agg,
                    clip_low=0.2, clip_high=0.2, dual_clip=None, temperature=1.0):
    """``ppo_loss`` through one of its ops on the ``torch`` backend: ``fused-op`` (the forward writes dlogits, as
    the CUDA fused kernels) or ``two-pass-op`` (the per-token op and its backward, as the CUDA two-pass path)."""
    from rlhf_kernels.ops import ppo as ppo_ops

    scalars = (kl_coef, kl_estimator, entropy_coef, clip_low, clip_high, dual_clip)
    if route == "fused-op":
        loss, term, logp, entropy, kl, clipped, _, means = ppo_ops.ppo_loss_fused_call(
            logits, y, old, adv, ref, mask, temperature, -100, *scalars, loss_agg, 0, "torch", 0, ppo_ops.WHOLE, False,
            True)
        return ppo_ops.ppo_output(term, logp, entropy, kl, clipped, old, mask, loss_agg, loss=loss, means=means)
    term, logp, entropy, kl, clipped, _ = ppo_ops.ppo_term_fwd_call(
        logits, y, old, adv, ref, temperature, -100, *scalars, "torch", 0, ppo_ops.WHOLE, False)
    return ppo_ops.ppo_output(term, logp, entropy, kl, clipped, old, mask, loss_agg)


MASKED_NON_FINITE = {  # what a padded position may carry: (token [1, 2]'s target logit, old, ref, advantage)
    "target-of-probability-0": (float("-inf"), -3.0, -3.2, 0.4),
    "reference-of-probability-0": (None, -3.0, float("-inf"), 0.4),
    "old-of-probability-0": (None, float("-inf"), -3.2, 0.4),
    "nan-advantage": (None, -3.0, -3.2, float("nan")),
    "nan-reference": (None, -3.0, float("nan"), 0.4),
}


@pytest.mark.parametrize("backend,path", _ppo_backends())
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("padding", list(MASKED_NON_FINITE))
def test_ppo_loss_ignores_a_masked_token_whatever_it_holds(backend, path, loss_agg, estimator, padding, monkeypatch):
    """A masked-out token holding what padding may hold (a target logit of -inf, an old or reference log-prob of
    -inf, a NaN advantage or reference): its term may be infinite or NaN and so may its slope (k2's ∂k/∂logp at
    logp = -inf), yet the loss, the logged means and the gradient are the oracle's and finite on each CPU backend
    (the Triton one through its fused and its two-pass forms), that token's gradient row exactly 0. Autograd's
    0·inf had made that row NaN, and a NaN row reaches every weight of the model through the LM head."""
    if backend == "triton":
        monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", path)
    g = torch.Generator().manual_seed(8)
    B, T, V = 2, 5, 40
    x = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    target_logit, old_value, ref_value, adv_value = MASKED_NON_FINITE[padding]
    if target_logit is not None:
        x[1, 2, y[1, 2]] = target_logit
    mask = torch.ones(B, T)
    mask[1, 2] = 0.0
    old = R.logprobs(x, y).nan_to_num(0.0, 0.0, 0.0) - 0.1
    ref, adv = old - 0.2, torch.randn(B, T, generator=g)
    old[1, 2], ref[1, 2], adv[1, 2] = old_value, ref_value, adv_value
    kwargs = dict(kl_coef=0.5, kl_estimator=estimator, entropy_coef=0.01, loss_agg=loss_agg)
    leaf = x.clone().requires_grad_()
    if path in ("fused-op", "two-pass-op"):
        out = _ppo_loss_by_op(path, leaf, y, old, adv, mask, ref, **kwargs)
    else:
        out = rk.ppo_loss(leaf, y, old, adv, mask, ref_logp=ref, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    x64 = x.double().requires_grad_()
    oracle = R.ppo_loss(x64, y, old.double(), adv.double(), mask.double(), ref_logp=ref.double(), **kwargs)
    (grad64,) = torch.autograd.grad(oracle.loss, x64)
    assert torch.isfinite(oracle.loss) and torch.isfinite(grad64).all()
    for name in ("loss", "clip_frac", "approx_kl"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(oracle, name), atol=1e-6, rtol=1e-5)
    assert torch.equal(grad[1, 2], torch.zeros(V)) and torch.equal(grad64[1, 2], torch.zeros(V, dtype=torch.float64))
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend,path", _ppo_backends())
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_gradient_in_every_clip_regime(backend, path, dual_clip, monkeypatch):
    """Loss, clip fraction and dlogits against the oracle for ratios in every regime of the clipped objective, with
    both signs of the advantage: below 1 - clip_low, inside, above 1 + clip_high, beyond the dual clip and past the
    ±20 log-ratio clamp. The other tests draw old log-probs near the policy's, whose ratios stay within e^±0.9: a
    dual clip of 3 was never active there, and the CPU backends' backward with max(pg_u, pg_c) turned into a
    min(...) passed every test. Log-ratios sit ≥ 0.1 from each kink (sub-gradients are a convention there)."""
    if backend == "triton":
        monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", path)
    g = torch.Generator().manual_seed(11)
    B, T, V = 2, len(LOG_RATIOS), 37
    x = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    old, adv = old_logp_and_advantages(R.logprobs(x.double(), y, temperature=0.9))  # each ratio with each sign
    log_ratio = torch.tensor(LOG_RATIOS).expand(B, T)
    ref = old + 0.3
    mask = torch.ones(B, T)
    kwargs = dict(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, loss_agg="token-mean", clip_low=0.2,
                  clip_high=0.28, dual_clip=dual_clip)
    active = (adv < 0) & (log_ratio.exp() > 3.0)
    assert active.sum() == 3 and (log_ratio.abs() > 20).sum() == 4  # the dual clip's regime and the clamp's
    leaf = x.clone().requires_grad_()
    if path in ("fused-op", "two-pass-op"):
        out = _ppo_loss_by_op(path, leaf, y, old, adv, mask, ref, temperature=0.9, **kwargs)
    else:
        out = rk.ppo_loss(leaf, y, old, adv, mask, ref_logp=ref, temperature=0.9, backend=backend, **kwargs)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    x64 = x.double().requires_grad_()
    oracle = R.ppo_loss(x64, y, old.double(), adv.double(), mask.double(), ref_logp=ref.double(), temperature=0.9,
                        **kwargs)
    (grad64,) = torch.autograd.grad(oracle.loss, x64)
    for name in ("loss", "clip_frac", "approx_kl"):
        torch.testing.assert_close(getattr(out, name).double(), getattr(oracle, name), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"] if INTERPRETED_TRITON else ["torch"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_ppo_term_op_backward_through_every_output(backend, kl_estimator):
    """The per-token op ``rlhf_kernels::ppo_term_fwd`` (the CUDA two-pass route's forward; its backward's per-token
    derivative is the CUDA one's) differentiated through each of its outputs at once, term, logp, entropy and kl,
    each with its own upstream weight, against float64 autograd of the oracle. ``ppo_loss`` detaches ``kl``, so the
    kl output's gradient ran in no test: its sign flipped in ``_term_backward_writer`` passed."""
    from rlhf_kernels.ops import ppo as ppo_ops

    g = torch.Generator().manual_seed(12)
    B, T, V = 2, len(LOG_RATIOS), 23
    x = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    old, _ = old_logp_and_advantages(R.logprobs(x.double(), y, temperature=0.9))
    adv, ref = torch.randn(B, T, generator=g), old + 0.3
    weights = torch.rand(4, B, T, generator=g, dtype=torch.float64) + 0.5
    options = dict(kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01, clip_low=0.2, clip_high=0.28,
                   dual_clip=3.0)
    leaf = x.clone().requires_grad_()
    outputs = ppo_ops.ppo_term_fwd_call(leaf, y, old, adv, ref, 0.9, -100, *options.values(), backend, 0,
                                        ppo_ops.WHOLE, False)[:4]
    (grad,) = torch.autograd.grad(outputs, leaf, list(weights.float()))
    x64 = x.double().requires_grad_()
    logp, entropy = R.logprobs(x64, y, temperature=0.9, return_entropy=True)
    term, kl, _ = R.ppo_token_terms(logp, entropy, old.double(), adv.double(), ref_logp=ref.double(), **options)
    (grad64,) = torch.autograd.grad((term, logp, entropy, kl), x64, list(weights))
    torch.testing.assert_close(grad.double(), grad64, atol=1e-5, rtol=1e-4)
