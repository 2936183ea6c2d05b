"""The fused PPO kernels' per-token arithmetic without a GPU: ``token_terms.cuh`` built as host C++.

``finish_ppo_row`` (ppo_term.cuh) turns each row's log-prob into the clipped surrogate ``pg``, its derivative
``∂pg/∂logp``, the clip flag, the KL estimate ``k`` and ``∂k/∂logp``, from which the kernels write the term and
the gradient's per-token coefficient. Those lines (``ppo_pg``, ``kl_k``, ``kl_k_dlogp``) are compiled here for
the host (``rk_emulate_ppo_token`` in ``row_stats_emulation.cpp``) and held against the float64 oracle
(``reference.ppo_token_terms`` and ``reference.kl_estimate``, their derivatives by autograd) on random tokens
drawn to reach every branch: ratios inside and outside the clip range, log-ratios past the ±20 clamp and on it,
negative advantages under the dual clip, zero advantages, KL near 0 (the series) and far from it, and the
infinities of a target or a reference token of probability 0.

``rk_emulate_ppo_rows`` then runs the fused PPO kernels' whole per-row forward on logits: sweep 1's statistics
(the emulated threads and cluster slices), ``finish_ppo_row`` itself, and what it writes: the term, log-prob,
entropy, KL, clip flag and lse of each token and the coefficients ``G_logp = w·∂term/∂logp``, ``G_H =
-w·entropy_coef`` that the kernels' second sweep writes dlogits from (that sweep given those coefficients is
``test_row_stats_emulation.py``'s ``test_fused_ppo_gradient_paths``).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_kernels import reference
from tests.cuda.test_row_stats_emulation import DTYPE_CODE, DTYPES, IGNORE, VEC
from tests.tolerance import assert_rows_match_oracle

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.version_independent]

ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
INF = float("inf")


def emulate_token_terms(lib, logp, old, adv, ref, *, clip_low, clip_high, dual_clip, estimator):
    """``(pg, dpg, clipped, kl, dk)`` of the CUDA per-token code, float32 (poisoned: every token must be written)."""
    n = logp.numel()
    out = [torch.full((n,), float("nan")) for _ in range(5)]
    inputs = [t.float().contiguous() for t in (logp, old, adv, ref)]
    rc = lib.rk_emulate_ppo_token(*(t.data_ptr() for t in inputs), n, clip_low, clip_high, dual_clip is not None,
                                  dual_clip or 0.0, ESTIMATORS[estimator], *(t.data_ptr() for t in out))
    assert rc == 0
    return out


def oracle_token_terms(logp, old, adv, ref, dtype, *, clip_low, clip_high, dual_clip, estimator):
    """The same five from the reference in ``dtype``, derivatives by autograd."""
    x = logp.to(dtype).requires_grad_()
    pg, _, clipped = reference.ppo_token_terms(
        x, torch.zeros_like(x), old.to(dtype), adv.to(dtype), ref_logp=None, kl_coef=0.0, kl_estimator=estimator,
        entropy_coef=0.0, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    (dpg,) = torch.autograd.grad(pg.sum(), x)
    x = logp.to(dtype).requires_grad_()
    kl = reference.kl_estimate(x, ref.to(dtype), estimator)
    (dk,) = torch.autograd.grad(kl.sum(), x)
    return pg.detach(), dpg, clipped.to(dtype), kl.detach(), dk


def random_tokens(seed: int, n: int = 4096):
    """float32 ``(logp, old, adv, ref)`` whose tokens cover every branch of the per-token code."""
    g = torch.Generator().manual_seed(seed)

    def pick(*choices):
        return torch.tensor(choices)[torch.randint(len(choices), (n,), generator=g)]

    logp = -torch.exp(torch.randn(n, generator=g) * 2.0)  # log-probs from ~-1e-3 to ~-1e3
    logp = torch.where(torch.rand(n, generator=g) < 0.02, torch.zeros(n), logp)  # a certain token
    # old policy: near (ratio ~1, at the clip range's edges) to far (past the ±20 log-ratio clamp)
    old = logp + torch.randn(n, generator=g) * pick(0.01, 0.1, 0.3, 1.0, 30.0)
    adv = torch.randn(n, generator=g) * pick(0.1, 1.0, 10.0) * (torch.rand(n, generator=g) > 0.03)
    ref = logp + torch.randn(n, generator=g) * pick(1e-4, 1e-2, 0.3, 3.0, 40.0)
    # exact ties on the log-ratio clamp: the closed interval passes the gradient there, in the oracle and kernels
    # (log-probs of a few fractional bits, so that logp - old is exactly ±20 in float32 too)
    ties = torch.rand(n, generator=g) < 0.02
    logp = torch.where(ties, (logp.clamp_min(-100.0) * 64).round() / 64, logp)
    old = torch.where(ties, logp - pick(20.0, -20.0), old)
    # probability-0 tokens: the target's (logp = -inf) or the reference's (ref = -inf); their old log-probs finite
    logp = torch.where(torch.rand(n, generator=g) < 0.01, torch.full((n,), -INF), logp)
    ref = torch.where(torch.rand(n, generator=g) < 0.01, torch.full((n,), -INF), ref)
    old = torch.where(torch.isfinite(old), old, torch.full((n,), -5.0))
    return logp, old, adv, ref


def _near_a_kink(logp, old, adv, *, clip_low, clip_high, dual_clip, margin=1e-5):
    """Tokens whose float64 ratio lies within ``margin`` (relative) of a point where ∂pg/∂logp jumps (a clip bound,
    the dual clip, an end of the log-ratio clamp away from the exact ties): float32 rounding may put them on either
    side, with ∂pg/∂logp and the clip flag of that side. ``pg`` itself is continuous there and is compared."""
    raw = logp.double() - old.double()
    ratio = raw.clamp(-20, 20).exp()
    near = torch.zeros_like(raw, dtype=torch.bool)
    for bound in (1.0 - clip_low, 1.0 + clip_high) + ((dual_clip,) if dual_clip is not None else ()):
        near |= (ratio - bound).abs() <= margin * bound
    near |= ((raw.abs() - 20.0).abs() <= margin * 20.0) & (raw.abs() != 20.0)
    return near & (adv != 0)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("clips", [(0.2, 0.2, None), (0.2, 0.28, 3.0), (0.1, 0.2, 1.5)])
@pytest.mark.parametrize("seed", range(3))
def test_per_token_terms_match_the_oracle(emu, estimator, clips, seed):
    clip_low, clip_high, dual_clip = clips
    opts = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, estimator=estimator)
    tokens = random_tokens(1000 * seed + 7 * ESTIMATORS[estimator] + len(str(clips)))
    fast = emulate_token_terms(emu, *tokens, **opts)
    in_dtype = oracle_token_terms(*tokens, torch.float32, **opts)
    oracle = oracle_token_terms(*tokens, torch.float64, **opts)
    keep = ~_near_a_kink(*tokens[:3], clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
    what = f"{estimator}/{clips}/seed {seed}"
    for i, name in enumerate(("pg", "dpg", "clipped", "kl", "dk")):
        rows = slice(None) if name in ("pg", "kl", "dk") else keep
        # exp(d) past float32's range (k3 at d > 88.7): infinite in any float32 code, so that is the oracle there
        beyond = torch.isfinite(oracle[i]) & torch.isinf(in_dtype[i])
        expected = torch.where(beyond, in_dtype[i].double(), oracle[i])
        assert_rows_match_oracle(fast[i][rows], in_dtype[i][rows], expected[rows], torch.float32, f"{what}/{name}")
    assert keep.float().mean() > 0.97, "the kinks' margin left too few tokens compared"


def test_k3_and_its_derivative_keep_their_relative_precision_near_zero(emu):
    """Near d = 0, k3 ~ d²/2 and ∂k3/∂logp ~ -d: an absolute floor (the rule's 1e-5 of max(1, |value|)) would
    pass exp(d) - 1 - d's cancellation, so these are held to relative error (the series gives ~1e-7)."""
    logp = -torch.rand(2000, generator=torch.Generator().manual_seed(8)) * 5
    d = torch.logspace(-6, math.log10(0.49), 1000)
    ref = logp + torch.cat([d, -d])
    zeros = torch.zeros_like(logp)
    _, _, _, kl, dk = emulate_token_terms(emu, logp, zeros, zeros, ref, clip_low=0.2, clip_high=0.2, dual_clip=None,
                                          estimator="k3")
    _, _, _, okl, odk = oracle_token_terms(logp, zeros, zeros, ref, torch.float64, clip_low=0.2, clip_high=0.2,
                                           dual_clip=None, estimator="k3")
    assert ((kl.double() - okl).abs() / okl).max() < 1e-4
    assert ((dk.double() - odk).abs() / odk.abs()).max() < 1e-4


def test_the_draws_reach_every_branch():
    """The random tokens are not a test that cannot fail: each branch of the per-token code is hit."""
    logp, old, adv, ref = random_tokens(0)
    raw = logp.double() - old.double()
    ratio = raw.clamp(-20, 20).exp()
    finite = torch.isfinite(raw)
    assert ((ratio < 0.8) & finite).sum() > 100 and ((ratio > 1.2) & finite).sum() > 100  # both clip sides
    assert ((ratio > 3.0) & (adv < 0)).sum() > 50  # the dual clip's branch
    assert (raw.abs() > 20).sum() > 50 and (raw.abs() == 20).sum() > 20  # past the clamp, and on it
    d = ref.double() - logp.double()
    assert (d.abs() < 0.5).sum() > 500 and (d.abs() >= 0.5).sum() > 500  # k3's series and its direct form
    assert torch.isneginf(logp).sum() > 10 and torch.isneginf(ref).sum() > 10 and (adv == 0).sum() > 30


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_probability_zero_tokens_have_the_oracle_derivatives(emu, estimator):
    """A reference log-prob of -inf: k = +inf (k1, k2, k3) and ∂k/∂logp = 1 (k1, k3: -expm1(-inf)), -d = +inf (k2);
    a target log-prob of -inf: the ratio sits on the clamp, no policy gradient; k1's derivative stays 1."""
    logp = torch.tensor([-1.0, -INF, -0.5])
    ref = torch.tensor([-INF, -2.0, -0.7])
    old = torch.tensor([-1.2, -3.0, -0.6])
    adv = torch.tensor([0.7, -1.3, 0.2])
    opts = dict(clip_low=0.2, clip_high=0.2, dual_clip=None, estimator=estimator)
    pg, dpg, _, kl, dk = emulate_token_terms(emu, logp, old, adv, ref, **opts)
    opg, odpg, _, okl, odk = oracle_token_terms(logp, old, adv, ref, torch.float64, **opts)
    assert kl[0] == INF and dk[0] == {"k1": 1.0, "k2": INF, "k3": 1.0}[estimator] == odk[0]
    assert dpg[1] == 0.0 == odpg[1] and pg[1] == pytest.approx(float(opg[1]), rel=1e-6)
    if estimator == "k1":
        assert kl[1] == -INF and dk[1] == 1.0 == odk[1]
    assert math.isclose(kl[2], okl[2], rel_tol=1e-5) and math.isclose(dk[2], odk[2], rel_tol=1e-5)


def test_a_bad_estimator_is_refused(emu):
    t = torch.zeros(2)
    rc = emu.rk_emulate_ppo_token(*(t.data_ptr() for t in (t, t, t, t)), 2, 0.2, 0.2, False, 0.0, 4,
                                  *(t.data_ptr() for _ in range(5)))
    assert rc == 2


# ----------------------------------------------------------------------------- whole rows: finish_ppo_row

PPO_OUTPUTS = ("term", "logp", "entropy", "kl", "clipped", "lse")


def emulate_ppo_rows(lib, x, y, old, adv, ref, weights, opts, *, threads=128, cluster=1):
    """``(outputs, coefficients)`` of ppo.cu's per-row forward on ``x[rows, V]`` (vocab stride 1): outputs a dict of
    ``PPO_OUTPUTS``, coefficients ``[rows, 2]`` = (G_logp, G_H), None without ``weights``; all poisoned first."""
    rows, V = x.shape
    assert x.stride(1) == 1
    outputs = torch.full((6, rows), float("nan"))
    tok = torch.full((rows, 4), float("nan"))
    scalars = [None if t is None else t.float().contiguous() for t in (old, adv, ref, weights)]
    ptr = [None if t is None else t.data_ptr() for t in scalars]
    rc = lib.rk_emulate_ppo_rows(
        DTYPE_CODE[x.dtype], x.data_ptr(), y.contiguous().data_ptr(), rows, x.stride(0), V, 1.0 / opts["temperature"],
        IGNORE, threads, cluster, *ptr, opts["kl_coef"], ESTIMATORS[opts["kl_estimator"]], opts["entropy_coef"],
        opts["clip_low"], opts["clip_high"], opts["dual_clip"] is not None, opts["dual_clip"] or 0.0,
        outputs.data_ptr(), tok.data_ptr())
    assert rc == 0
    return dict(zip(PPO_OUTPUTS, outputs)), (None if weights is None else tok[:, 2:])


def oracle_ppo_rows(x, y, old, adv, ref, weights, opts):
    """The same from the reference on ``x`` in its own dtype (float64 for the oracle): log-probs and entropies,
    ``ppo_token_terms`` on them, and the coefficients by autograd of the weighted terms."""
    T = opts["temperature"]
    with torch.no_grad():
        logp, entropy = reference.logprobs(x, y, temperature=T, ignore_index=IGNORE, return_entropy=True)
    dtype = logp.dtype
    logp, entropy = logp.requires_grad_(), entropy.requires_grad_()
    term, kl, clipped = reference.ppo_token_terms(
        logp, entropy, old.to(dtype), adv.to(dtype), ref_logp=None if ref is None else ref.to(dtype),
        kl_coef=opts["kl_coef"], kl_estimator=opts["kl_estimator"], entropy_coef=opts["entropy_coef"],
        clip_low=opts["clip_low"], clip_high=opts["clip_high"], dual_clip=opts["dual_clip"])
    lse = torch.logsumexp(x.to(dtype) / T, dim=-1)
    outputs = dict(zip(PPO_OUTPUTS, (term.detach(), logp.detach(), entropy.detach(), kl, clipped.to(dtype), lse)))
    if weights is None:
        return outputs, None
    w = weights.to(dtype)
    # a zero-weight (masked) token's coefficients are 0, even where its term's slope is infinite (reference.ppo_loss)
    term = reference.ppo_token_terms(
        reference.without_gradient_where(logp, w), entropy, old.to(dtype), adv.to(dtype),
        ref_logp=None if ref is None else ref.to(dtype), kl_coef=opts["kl_coef"], kl_estimator=opts["kl_estimator"],
        entropy_coef=opts["entropy_coef"], clip_low=opts["clip_low"], clip_high=opts["clip_high"],
        dual_clip=opts["dual_clip"])[0]
    g_logp, g_ent = torch.autograd.grad(reference.masked(term, w).sum(), (logp, entropy))
    return outputs, torch.stack([g_logp, g_ent], dim=-1)


def random_ppo_rows(seed: int, dtype: torch.dtype, V: int, rows: int = 48):
    """Logits rows starting at every 16-byte misalignment, extreme ones among them, targets (some ignored, one of
    probability 0), and the rows' PPO scalars around the oracle's log-probs."""
    g = torch.Generator().manual_seed(seed)
    offset = seed % VEC[dtype]
    wide = torch.randn(rows, V + VEC[dtype], generator=g) * 3.0
    x = wide[:, offset:offset + V]
    x[0] = 1e4 if dtype == torch.float32 else 60.0  # all equal
    x[1, ::3] = float("-inf")
    if V > 1:
        x[2] = torch.linspace(-1e4, 1e4, V) if dtype != torch.float16 else torch.linspace(-6e4, 6e4, V)
    y = torch.randint(0, V, (rows,), generator=g)
    y[torch.rand(rows, generator=g) < 0.1] = IGNORE
    y[1] = 0  # a target of probability 0: its logit is -inf
    x = x.to(dtype)
    with torch.no_grad():
        logp = reference.logprobs(x.double(), y, ignore_index=IGNORE).float()
    finite = torch.isfinite(logp)

    def pick(*choices):
        return torch.tensor(choices)[torch.randint(len(choices), (rows,), generator=g)]

    noise = torch.randn(rows, generator=g)
    old = torch.where(finite, logp, torch.full_like(logp, -3.0)) + noise * pick(0.01, 0.3, 30.0)
    adv = torch.randn(rows, generator=g) * pick(0.0, 1.0, 10.0)
    noise = torch.randn(rows, generator=g)
    ref = torch.where(finite, logp, torch.full_like(logp, -2.0)) + noise * pick(1e-3, 0.3, 3.0)
    ref[3] = float("-inf")  # the reference policy excludes this row's token
    weights = torch.rand(rows, generator=g) * (torch.rand(rows, generator=g) < 0.8)
    return x, y, old, adv, ref, weights


PPO_SETTINGS = (
    dict(temperature=1.0, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_low=0.2, clip_high=0.2,
         dual_clip=3.0),
    dict(temperature=0.7, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.0, clip_low=0.2, clip_high=0.28,
         dual_clip=None),
    dict(temperature=1.0, kl_coef=1.0, kl_estimator="k1", entropy_coef=0.3, clip_low=0.1, clip_high=0.2,
         dual_clip=None),
)


@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("setting", range(len(PPO_SETTINGS)))
@pytest.mark.parametrize("V,cluster", [(1, 1), (7, 1), (300, 2), (4097, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ppo_rows_forward_matches_the_oracle(emu, dtype, V, cluster, setting, with_ref):
    opts = PPO_SETTINGS[setting]
    x, y, old, adv, ref, weights = random_ppo_rows(V + setting, dtype, V)
    ref = ref if with_ref else None
    opts = dict(opts, kl_coef=opts["kl_coef"] if with_ref else 0.0)
    for w in (weights, None):  # the forward-with-gradient kernels, and the forward-only one
        fast, fast_coef = emulate_ppo_rows(emu, x, y, old, adv, ref, w, opts, cluster=cluster)
        in_dtype, ref_coef = oracle_ppo_rows(x, y, old, adv, ref, w, opts)
        oracle, oracle_coef = oracle_ppo_rows(x.double(), y, old, adv, ref, w, opts)
        what = f"{dtype}/V={V}/cluster={cluster}/{opts}/grad={w is not None}"
        kinks = _near_a_kink(oracle["logp"], old, adv, clip_low=opts["clip_low"], clip_high=opts["clip_high"],
                             dual_clip=opts["dual_clip"])
        for name in PPO_OUTPUTS:
            keep = ~kinks if name == "clipped" else slice(None)
            assert_rows_match_oracle(fast[name][keep], in_dtype[name][keep], oracle[name][keep], dtype,
                                     f"{what}/{name}")
        if w is not None:
            for i, name in enumerate(("G_logp", "G_H")):
                keep = ~kinks if name == "G_logp" else slice(None)
                assert_rows_match_oracle(fast_coef[keep, i], ref_coef[keep, i], oracle_coef[keep, i], dtype,
                                         f"{what}/{name}")


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_a_zero_weight_token_has_zero_coefficients_whatever_its_inputs(emu, estimator):
    """A masked token (weight 0) gets G_logp = G_H = 0 even where its term's slope is not finite: a target of
    probability 0 (k2's ∂k/∂logp = -inf), a reference of -inf, a NaN advantage, an old log-prob of -inf. With a
    weight the same tokens keep the oracle's non-finite coefficient (they are the user's to see)."""
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(3))
    x[0, 4] = float("-inf")
    y = torch.tensor([4, 1, 2, 3, 5, 6])
    old = torch.tensor([-2.0, -1.5, -2.2, -INF, -1.0, -2.5])
    adv = torch.tensor([0.8, -0.4, float("nan"), 1.1, 0.3, -0.9])
    ref = torch.tensor([-2.1, -INF, -2.0, -1.9, float("nan"), -2.4])
    opts = dict(temperature=1.0, kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01, clip_low=0.2,
                clip_high=0.2, dual_clip=None)
    for weights in (torch.zeros(6), torch.full((6,), 0.25)):
        _, coef = emulate_ppo_rows(emu, x, y, old, adv, ref, weights, opts)
        _, oracle = oracle_ppo_rows(x.double(), y, old, adv, ref, weights, opts)
        if weights[0] == 0:
            assert torch.equal(coef, torch.zeros(6, 2)) and torch.equal(oracle, torch.zeros(6, 2, dtype=oracle.dtype))
        else:  # the weighted tokens: non-finite where the oracle's are, as the oracle's
            assert torch.equal(torch.isfinite(coef), torch.isfinite(oracle))
            assert not torch.isfinite(coef[:, 0]).all() and torch.isfinite(coef[5]).all()
