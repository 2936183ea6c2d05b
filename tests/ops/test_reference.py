"""The oracle checked against direct float64 computations written with Python loops and ``math``."""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting

torch.manual_seed(0)

CPU_BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]


def _row_stats(row):
    """(lse, probabilities) of one row of Python floats, by hand."""
    finite = [z for z in row if z != -math.inf]
    m = max(finite)
    total = sum(math.exp(z - m) for z in finite)
    lse = m + math.log(total)
    return lse, [math.exp(z - lse) if z != -math.inf else 0.0 for z in row]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_loops(temperature):
    logits = torch.randn(5, 11, dtype=torch.float64) * 3
    logits[2, 3] = -math.inf
    targets = torch.randint(0, 11, (5,))
    targets[4] = -100
    logp, entropy = R.logprobs(logits, targets, temperature=temperature, return_entropy=True)
    for i in range(5):
        z = [v / temperature for v in logits[i].tolist()]
        lse, p = _row_stats(z)
        if targets[i] == -100:
            assert logp[i] == 0 and entropy[i] == 0
            continue
        assert logp[i].item() == pytest.approx(z[targets[i]] - lse, abs=1e-12)
        expected_h = -sum(pi * (zi - lse) for pi, zi in zip(p, z) if pi > 0)
        assert entropy[i].item() == pytest.approx(expected_h, abs=1e-12)


def test_logprobs_gradient_matches_design_formula():
    """dz = g_logp·(onehot(y) - p) - g_ent·p·(z - Σp·z), divided by T."""
    T = 1.3
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (4,))
    g_logp, g_ent = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    logp, entropy = R.logprobs(logits, targets, temperature=T, return_entropy=True)
    (grad,) = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), logits)
    for i in range(4):
        z = [v / T for v in logits[i].tolist()]
        _, p = _row_stats(z)
        mean_z = sum(pi * zi for pi, zi in zip(p, z))
        for j in range(9):
            onehot = 1.0 if j == targets[i] else 0.0
            dz = g_logp[i].item() * (onehot - p[j]) - g_ent[i].item() * p[j] * (z[j] - mean_z)
            assert grad[i, j].item() == pytest.approx(dz / T, abs=1e-12)


def test_kl_estimators_match_math():
    logp = torch.randn(20, dtype=torch.float64)
    ref = torch.randn(20, dtype=torch.float64)
    for est, fn in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }.items():
        got = R.kl_estimate(logp, ref, est)
        for i in range(20):
            assert got[i].item() == pytest.approx(fn(logp[i].item(), ref[i].item()), abs=1e-12)
    clamped = R.kl_estimate(logp * 10, ref, "k1", clamp=0.5)
    assert clamped.abs().max() <= 0.5


def test_clamps_pass_the_gradient_at_their_bounds_on_every_torch():
    """The oracle's clamps (KL estimate, PPO log-ratio and ratio, value loss) pass the gradient on the closed
    interval, as every kernel does; torch.clamp alone passes it at a bound on torch 2.6 but not on 2.14."""
    x = torch.tensor([-10.0, -3.0, 10.0, 11.0, -12.0, float("nan")], dtype=torch.float64, requires_grad=True)
    y = R.clamp_closed(x, -10.0, 10.0)
    assert torch.equal(y[:5], torch.tensor([-10.0, -3.0, 10.0, 10.0, -10.0], dtype=torch.float64))
    assert torch.isnan(y[5])
    (grad,) = torch.autograd.grad(y.nansum(), x)
    assert torch.equal(grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    # k1 landing exactly on the clamp (bf16 log-probs 10 apart): the reference and the op's backends pass it
    logp = torch.tensor([-36.5, -1.0], dtype=torch.bfloat16)
    ref = torch.tensor([-46.5, -1.5], dtype=torch.bfloat16)
    interpreted = triton_importable() and triton_interpreting()
    backends = ["torch"] + (["triton"] if interpreted else [])  # Triton on CPU tensors: its interpreter
    for fn in [lambda a, b: R.kl_estimate(a, b, "k1", clamp=10.0)] + [
        lambda a, b, backend=backend: rk.kl_estimate(a, b, "k1", clamp=10.0, backend=backend) for backend in backends
    ]:
        a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
        k = fn(a, b)
        assert k[0].item() == 10.0
        da, db = torch.autograd.grad(k.float().sum(), (a, b))
        assert torch.equal(da.float(), torch.ones(2)) and torch.equal(db.float(), -torch.ones(2))
    # a value exactly clip away from its old value: both branches' gradients pass
    v = torch.tensor([1.25], dtype=torch.float64, requires_grad=True)
    old, ret = torch.tensor([1.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    (gv,) = torch.autograd.grad(R.value_loss(v, old, ret, torch.ones(1), clip=0.25), v)
    assert gv.item() == (1.25 - 3.0)


def test_kl_divergence_matches_loops_and_design_gradient():
    T = 0.9
    z = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1, 0, 1])
    kl = R.kl_divergence(z, r, temperature=T, mask=mask)
    g = torch.randn(3, dtype=torch.float64)
    dz, dr = torch.autograd.grad((kl * g).sum(), (z, r))
    for i in range(3):
        zs = [v / T for v in z[i].tolist()]
        rs = [v / T for v in r[i].tolist()]
        lse_z, p = _row_stats(zs)
        lse_r, q = _row_stats(rs)
        expected = sum(pj * ((zj - lse_z) - (rj - lse_r)) for pj, zj, rj in zip(p, zs, rs))
        if mask[i] == 0:
            assert kl[i] == 0 and dz[i].abs().max() == 0
            continue
        assert kl[i].item() == pytest.approx(expected, abs=1e-12)
        for j in range(7):
            log_ratio = (zs[j] - lse_z) - (rs[j] - lse_r)
            assert dz[i, j].item() == pytest.approx(g[i].item() * p[j] * (log_ratio - expected) / T, abs=1e-12)
            assert dr[i, j].item() == pytest.approx(g[i].item() * (q[j] - p[j]) / T, abs=1e-12)


def _agg_by_hand(term, mask, mode):
    B, T = len(term), len(term[0])
    if mode == "token-mean":
        den = sum(sum(row) for row in mask)
        return sum(t * m for tr, mr in zip(term, mask) for t, m in zip(tr, mr)) / den if den else 0.0
    sums = [sum(t * m for t, m in zip(tr, mr)) for tr, mr in zip(term, mask)]
    if mode == "seq-mean-token-sum":
        return sum(sums) / B
    if mode == "seq-mean-token-sum-norm":
        return sum(sums) / (B * T)
    means = [s / sum(mr) for s, mr in zip(sums, mask) if sum(mr) > 0]
    return sum(means) / len(means) if means else 0.0


@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_ppo_loss_matches_per_token_loops(loss_agg, dual_clip):
    """The loss and every statistic (per-token log-prob, entropy and KL; clip fraction, approx KL) by hand. Two
    tokens have log-ratios beyond the ±20 clamp: +30 with a negative advantage (the unclipped surrogate, |A|·e^20,
    wins without a dual clip) and -30 with a positive one (A·e^-20 beside the 0.8 bound)."""
    B, T, V = 3, 4, 6
    logits = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T))
    logp, ent = R.logprobs(logits, targets, return_entropy=True)
    old = R.logprobs(logits + 0.5 * torch.randn_like(logits), targets)
    ref = R.logprobs(logits + 0.5 * torch.randn_like(logits), targets)
    adv = torch.randn(B, T, dtype=torch.float64)
    old[0, 1], adv[0, 1] = logp[0, 1] - 30.0, -abs(adv[0, 1]) - 0.1
    old[1, 0], adv[1, 0] = logp[1, 0] + 30.0, abs(adv[1, 0]) + 0.1
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    out = R.ppo_loss(
        logits, targets, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
        clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, loss_agg=loss_agg,
    )
    term, clipped, approx_kl = [], 0, 0.0
    for b in range(B):
        row = []
        for t in range(T):
            lp, a = logp[b, t].item(), adv[b, t].item()
            r = math.exp(max(-20.0, min(20.0, lp - old[b, t].item())))
            pg_unclipped, pg_clipped = -a * r, -a * min(max(r, 0.8), 1.28)
            pg = max(pg_unclipped, pg_clipped)
            active = pg_clipped > pg_unclipped
            if dual_clip is not None and a < 0:
                active = active or -a * dual_clip < pg
                pg = min(pg, -a * dual_clip)
            d = ref[b, t].item() - lp
            kl = math.exp(d) - d - 1
            assert out.kl[b, t].item() == pytest.approx(kl, abs=1e-12)
            assert out.logp[b, t].item() == pytest.approx(lp, abs=1e-12)
            assert out.entropy[b, t].item() == pytest.approx(ent[b, t].item(), abs=1e-12)
            row.append(pg + 0.1 * kl - 0.01 * ent[b, t].item())
            if mask[b, t]:
                clipped += active
                approx_kl += 0.5 * (lp - old[b, t].item()) ** 2
        term.append(row)
    tokens = mask.sum().item()
    assert out.loss.item() == pytest.approx(_agg_by_hand(term, mask.tolist(), loss_agg), rel=1e-12, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(clipped / tokens, abs=1e-12)
    assert out.approx_kl.item() == pytest.approx(approx_kl / tokens, rel=1e-12)


@pytest.mark.parametrize("loss_agg", R.LOSS_AGG_MODES)
def test_aggregate_loss_takes_every_leading_axis_as_sequences(loss_agg):
    """``term[2, 3, 5]`` aggregates as the 6 sequences of its ``[6, 5]`` view (by hand), in the oracle and in the op
    (``ppo_loss`` on ``[2, 3, 5, V]`` logits against the same tokens as ``[6, 5, V]``)."""
    term = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = (torch.rand(2, 3, 5) < 0.6).to(torch.float64)
    mask[1, 2] = 0  # an empty sequence
    by_hand = _agg_by_hand(term.reshape(6, 5).tolist(), mask.reshape(6, 5).tolist(), loss_agg)
    assert R.aggregate_loss(term, mask, loss_agg).item() == pytest.approx(by_hand, abs=1e-12)

    targets = torch.randint(0, 7, (2, 3, 5))
    old, adv = torch.randn(2, 3, 5, dtype=torch.float64) - 2, torch.randn(2, 3, 5, dtype=torch.float64)
    interpreted = ["triton"] if triton_importable() and triton_interpreting() else []
    for backend in CPU_BACKENDS + interpreted:  # Triton's fused step takes its weights from aggregation_weights
        dtype = torch.float32 if backend == "triton" else torch.float64
        logits = torch.randn(2, 3, 5, 7, dtype=dtype, requires_grad=True)
        nested = rk.ppo_loss(logits, targets, old, adv, mask, loss_agg=loss_agg, backend=backend)
        (nested_grad,) = torch.autograd.grad(nested.loss, logits)
        flat_logits = logits.detach().reshape(6, 5, 7).requires_grad_()
        flat = rk.ppo_loss(flat_logits, targets.reshape(6, 5), old.reshape(6, 5), adv.reshape(6, 5),
                           mask.reshape(6, 5), loss_agg=loss_agg, backend=backend)
        (flat_grad,) = torch.autograd.grad(flat.loss, flat_logits)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert nested.loss.item() == pytest.approx(flat.loss.item(), abs=tol), backend
        assert nested.clip_frac.item() == pytest.approx(flat.clip_frac.item(), abs=tol), backend
        torch.testing.assert_close(nested_grad.reshape(6, 5, 7), flat_grad, atol=tol, rtol=tol, msg=backend)


def test_the_ops_defaults_are_the_oracles():
    """Every keyword default of a reference function is its op's (DESIGN.md §2's signatures), so a test that calls
    both with defaults compares like with like; and the ops called without options match the oracle called with
    DESIGN.md's values spelled out."""
    import inspect

    checked = []
    for name, oracle in inspect.getmembers(R, inspect.isfunction):
        op = getattr(rk, name, None)
        if oracle.__module__ != R.__name__ or name.startswith("_") or op is None:
            continue
        op_params = inspect.signature(op).parameters
        for key, param in inspect.signature(oracle).parameters.items():
            if param.default is not inspect.Parameter.empty:
                assert key in op_params, f"rk.{name} has no keyword {key!r}, which the oracle has"
                assert op_params[key].default == param.default, f"{name}({key}=...): op and oracle differ"
        checked.append(name)
    assert {"logprobs", "kl_divergence", "kl_estimate", "ppo_loss", "gae", "linear_logprobs"} <= set(checked)

    rewards, values = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    mask = torch.ones(2, 6, dtype=torch.float64)
    torch.testing.assert_close(rk.gae(rewards, values, mask), R.gae(rewards, values, mask, gamma=1.0, lam=0.95))
    logits, ref_logits = torch.randn(3, 4, 9, dtype=torch.float64), torch.randn(3, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(rk.kl_divergence(logits, ref_logits),
                               R.kl_divergence(logits, ref_logits, temperature=1.0, mask=None))
    targets = torch.randint(0, 9, (3, 4))
    targets[0, 0] = -100
    old, ref, adv = (torch.randn(3, 4, dtype=torch.float64) - 2 for _ in range(3))
    mask = torch.ones(3, 4, dtype=torch.float64)
    got = rk.ppo_loss(logits, targets, old, adv, mask, ref_logp=ref)
    want = R.ppo_loss(logits, targets, old, adv, mask, ref_logp=ref, kl_coef=0.0, kl_estimator="k3", entropy_coef=0.0,
                      clip_low=0.2, clip_high=0.2, dual_clip=None, temperature=1.0, loss_agg="token-mean",
                      ignore_index=-100)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.clip_frac, want.clip_frac)


def test_ppo_loss_empty_mask_is_zero_with_finite_grad():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    for mode in R.LOSS_AGG_MODES:
        out = R.ppo_loss(logits, targets, zeros, zeros + 1, zeros, loss_agg=mode)
        (g,) = torch.autograd.grad(out.loss, logits)
        assert out.loss.item() == 0 and torch.isfinite(g).all()


def test_ppo_loss_gradcheck():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (2, 3))
    old = R.logprobs(logits.detach() + 0.3, targets)
    adv = torch.randn(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.float64)
    fn = lambda x: R.ppo_loss(x, targets, old, adv, mask, entropy_coef=0.05, clip_low=10, clip_high=10).loss
    assert torch.autograd.gradcheck(fn, (logits,))


def test_value_loss_matches_loops():
    v, vo, ret = (torch.randn(2, 5, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.float64)
    got = R.value_loss(v, vo, ret, mask, clip=0.2)
    total, count = 0.0, 0
    for i in range(2):
        for t in range(5):
            if mask[i, t]:
                vc = vo[i, t].item() + max(-0.2, min(0.2, v[i, t].item() - vo[i, t].item()))
                total += 0.5 * max((v[i, t].item() - ret[i, t].item()) ** 2, (vc - ret[i, t].item()) ** 2)
                count += 1
    assert got.item() == pytest.approx(total / count, abs=1e-12)
    unclipped = R.value_loss(v, vo, ret, mask, clip=None)
    assert unclipped.item() == pytest.approx((0.5 * (v - ret) ** 2 * mask).sum().item() / count, abs=1e-12)


def test_gae_matches_textbook_loop():
    gamma, lam = 0.99, 0.9
    rewards, values = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    lengths = [6, 3, 1]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(6)] for n in lengths], dtype=torch.float64)
    adv, ret = R.gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(6)):
            if t >= n:
                assert adv[b, t] == 0 and ret[b, t] == 0
                continue
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            running = delta + gamma * lam * (running if t + 1 < n else 0.0)
            assert adv[b, t].item() == pytest.approx(running, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(running + values[b, t].item(), abs=1e-12)


def test_reward_model_loss_matches_math():
    rc, rr = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = R.reward_model_loss(rc, rr, margin=0.5, center_coef=0.01)
    expected = sum(
        -math.log(1 / (1 + math.exp(-(c - r - 0.5)))) + 0.01 * (c + r) ** 2 for c, r in zip(rc.tolist(), rr.tolist())
    ) / 6
    assert got.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("loss_type", R.DPO_LOSS_TYPES)
def test_dpo_loss_matches_math(loss_type):
    pc, pr, rc, rr = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    beta, eps = 0.2, 0.1
    got = R.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    sig = lambda x: 1 / (1 + math.exp(-x))
    total = 0.0
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - b) - (c - d)
        if loss_type == "sigmoid":
            total += -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        elif loss_type == "ipo":
            total += (h - 1 / (2 * beta)) ** 2
        else:
            total += max(0.0, 1 - beta * h)
    assert got.item() == pytest.approx(total / 5, abs=1e-12)


def test_linear_logprobs_is_logprobs_of_the_matmul():
    h, w, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    y = torch.randint(0, 7, (4,))
    got = R.linear_logprobs(h, w, y, b, temperature=0.8)
    for i in range(4):
        z = [(sum(h[i, k].item() * w[j, k].item() for k in range(3)) + b[j].item()) / 0.8 for j in range(7)]
        lse, _ = _row_stats(z)
        assert got[i].item() == pytest.approx(z[y[i]] - lse, abs=1e-12)
