"""Fused Triton PPO term: loss, statistics and dlogits vs the float64 oracle; custom-op checks."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import ppo as ppo_ops
from triton_testutils import DEVICE, DTYPES, assert_rule, make_logits, make_targets, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(params=["fused", "two-pass"])
def ppo_path(request, monkeypatch):
    """``RLHF_KERNELS_TRITON_PPO``: the forward-with-gradient kernel (default) or the forward and backward kernels."""
    monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", request.param)
    return request.param


def _inputs(B, T, V, dtype, seed, *, strided=False):
    g = torch.Generator().manual_seed(seed)
    x = make_logits((B, T + 1, V), dtype, seed=seed)
    x = x[:, :-1] if strided else x[:, 1:].contiguous()
    y = make_targets((B, T), V, seed=seed, ignore_frac=0.1)
    mask = (y != -100) & (torch.rand(B, T, generator=g) < 0.9).to(DEVICE)
    mask[-1] = False if B > 2 else mask[-1]  # an empty sequence
    with torch.no_grad():
        logp = reference.logprobs(x.double(), y)
    # wide enough that the clip (|r - 1| > 0.2) and the dual clip (r > 2) are both often active
    old = (logp + torch.randn(B, T, generator=g).to(DEVICE) * 0.6).float()
    ref = (logp + torch.randn(B, T, generator=g).to(DEVICE) * 0.2).float()
    adv = torch.randn(B, T, generator=g).to(DEVICE)
    return x, y, old, adv, mask, ref


def _run(fn, x, args, kwargs, w):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    (out.loss * w).backward()
    return out, x.grad


def _check(x, y, old, adv, mask, kwargs):
    dtype = x.dtype
    args = (y, old, adv, mask)
    w = 1.7
    with poisoned_outputs():
        out, grad = _run(rk.ppo_loss, x, args, dict(kwargs, backend="triton"), w)
    out64, grad64 = _run(reference.ppo_loss, x.double(), args, kwargs, w)
    outl, gradl = _run(reference.ppo_loss, x, args, kwargs, w)
    assert isinstance(out, rk.PPOLossOutput)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    for name in ("loss", "logp", "entropy", "kl", "approx_kl"):
        assert_rule(name, getattr(out, name), getattr(outl, name), getattr(out64, name), dtype)
    torch.testing.assert_close(out.clip_frac.double(), out64.clip_frac, atol=1.01 / mask.numel(), rtol=0)
    assert grad.dtype == dtype
    assert_rule("dlogits", grad, gradl, grad64, dtype)
    assert not out.logp.requires_grad and not out.kl.requires_grad


@pytest.mark.usefixtures("ppo_path")
@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_matches_reference(loss_agg, kl_estimator, dual_clip):
    seed = len(loss_agg) * 7 + int(kl_estimator[1]) + (3 if dual_clip else 0)
    x, y, old, adv, mask, ref = _inputs(3, 5, 70, torch.float32, seed, strided=seed % 2 == 0)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, kl_estimator=kl_estimator, entropy_coef=0.01, clip_low=0.2,
                  clip_high=0.28, dual_clip=dual_clip, temperature=0.9, loss_agg=loss_agg)
    _check(x, y, old, adv, mask, kwargs)


@pytest.mark.usefixtures("ppo_path")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_odd_shapes(dtype):
    for B, T, V in ((1, 1, 1), (2, 3, 7), (2, 4, 130)):
        x, y, old, adv, mask, _ = _inputs(B, T, V, dtype, seed=V)
        _check(x, y, old, adv, mask, dict(entropy_coef=0.02, loss_agg="seq-mean-token-mean"))


@pytest.mark.usefixtures("ppo_path")
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_wild_ratios_hit_the_log_ratio_clamp(dual_clip):
    x, y, old, adv, mask, ref = _inputs(2, 6, 50, torch.float32, seed=21)
    adv[:, :3] = torch.tensor([-1.0, 1.0, -0.5], device=DEVICE)
    old = old.clone()
    old[:, :3] = reference.logprobs(x.double(), y)[:, :3].float() - torch.tensor([30.0, -30.0, 1.5], device=DEVICE)
    mask[:, :3] = y[:, :3] != -100
    # |logp - old| > 20 on some tokens (the clamp stops their gradient); r > 3 for the dual clip
    _check(x, y, old, adv, mask, dict(ref_logp=ref, kl_coef=0.05, dual_clip=dual_clip))


@pytest.mark.usefixtures("ppo_path")
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_a_target_of_probability_zero(kl_estimator):
    """A target whose logit is -inf has logp = -inf: its ratio sits at the clamp (no policy-gradient), and k1's
    derivative is the constant 1, so the k1 gradient is finite and the reference's (it was NaN: ``inf·0 + 1``);
    k2 and k3 have infinite derivatives there: a non-finite row for that token only, as the reference's."""
    x, y, old, adv, mask, ref = _inputs(2, 5, 33, torch.float32, seed=31)
    x[0, 1, y[0, 1]] = float("-inf")  # a masked-out vocabulary entry that is the target
    mask[0, 1] = True
    old[0, 1] = -3.0
    kwargs = dict(ref_logp=ref, kl_coef=0.5, kl_estimator=kl_estimator, entropy_coef=0.1)
    out, grad = _run(rk.ppo_loss, x, (y, old, adv, mask), dict(kwargs, backend="triton"), 1.0)
    out64, grad64 = _run(reference.ppo_loss, x.double(), (y, old, adv, mask), kwargs, 1.0)
    assert out.logp[0, 1] == float("-inf")
    if kl_estimator == "k1":
        finite = torch.isfinite(x.double())
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double()[finite], grad64[finite], rtol=1e-5, atol=1e-6)
    else:
        assert not torch.isfinite(grad[0, 1]).any() and not torch.isfinite(grad64[0, 1]).all()
        others = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        others[0, 1] = False
        assert torch.isfinite(grad[others]).all()


@pytest.mark.usefixtures("ppo_path")
def test_a_reference_log_prob_of_minus_inf_keeps_the_k3_gradient_finite():
    """ref_logp = -inf (the reference policy excludes the sampled token): k3 is +inf, so the loss is, but its
    derivative in logp is the finite 1 and every row of dlogits is the oracle's (it was NaN: -(-inf + inf))."""
    x, y, old, adv, mask, ref = _inputs(2, 5, 33, torch.float32, seed=32)
    ref = ref.clone()
    ref[0, 1] = float("-inf")
    mask[0, 1] = True
    kwargs = dict(ref_logp=ref, kl_coef=0.5, kl_estimator="k3")
    out, grad = _run(rk.ppo_loss, x, (y, old, adv, mask), dict(kwargs, backend="triton"), 1.0)
    out64, grad64 = _run(reference.ppo_loss, x.double(), (y, old, adv, mask), kwargs, 1.0)
    assert out.kl[0, 1] == float("inf") and out64.kl[0, 1] == float("inf")
    assert torch.isfinite(grad64).all()
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("ppo_path")
def test_empty_mask_and_all_ignored():
    x, y, old, adv, mask, _ = _inputs(2, 4, 40, torch.float32, seed=22)
    y[:] = -100
    with poisoned_outputs():
        out, grad = _run(rk.ppo_loss, x, (y, old, adv, torch.zeros_like(mask)), dict(backend="triton"), 1.0)
    assert out.loss.item() == 0.0 and (grad == 0).all()
    assert (out.logp == 0).all() and (out.entropy == 0).all()


def test_cpu_default_path_unchanged():
    x, y, old, adv, mask, ref = _inputs(2, 3, 30, torch.float32, seed=23)
    if DEVICE.type != "cpu":
        pytest.skip("checks the CPU composition")
    a = rk.ppo_loss(x, y, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    b = reference.ppo_loss(x, y, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    for name in a._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)


def test_op_backends_agree_and_extra_output_grads():
    """The fused op's backward also honours gradients of its logp / entropy / kl outputs."""
    x, y, old, adv, mask, ref = _inputs(2, 3, 45, torch.float32, seed=24)
    scal = (0.8, -100, 0.1, "k3", 0.01, 0.2, 0.3, 2.5)
    weights = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads, outs = [], []
    for backend in ("triton", "torch"):
        xt = x.clone().requires_grad_()
        out = ppo_ops.ppo_term_fwd(xt, y, old, adv, ref, *scal, backend)
        sum((w * o).sum() for w, o in zip(weights, out[:4])).backward()
        assert 0 < out[4].sum() < out[4].numel()  # some tokens clipped, some not
        grads.append(xt.grad)
        outs.append(out)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    x, y, old, adv, mask, ref = _inputs(2, 3, 40, torch.float32, seed=25)
    scal = (0.8, -100, 0.1, "k2", 0.01, 0.2, 0.3)
    x = x.requires_grad_()
    torch.library.opcheck(ppo_ops.ppo_term_fwd, (x, y, old, adv, ref) + scal + (2.0, backend))
    torch.library.opcheck(ppo_ops.ppo_term_fwd, (x, y, old, adv, None) + scal + (None, backend))
    term, logp, ent, kl, clipped, lse = ppo_ops.ppo_term_fwd(x.detach(), y, old, adv, ref, *scal, 2.0, backend)
    gs = [torch.randn_like(term) for _ in range(4)]
    torch.library.opcheck(ppo_ops.ppo_term_bwd, (*gs, x.detach(), y, logp, ent, lse, old, adv, ref) + scal + (2.0, backend))


@pytest.mark.usefixtures("ppo_path")
def test_torch_compile_fullgraph():
    x, y, old, adv, mask, ref = _inputs(2, 4, 60, torch.float32, seed=26)

    def f(logits):
        out = rk.ppo_loss(logits, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01,
                          loss_agg="seq-mean-token-mean", backend="triton")
        return out.loss, out.clip_frac

    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_c, frac_c = torch.compile(f, fullgraph=True)(xc)
    loss_c.backward()
    loss_e, frac_e = f(xe)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(frac_c, frac_e)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_ppo_loss_overwrite_logits_writes_the_backward_over_them():
    """Triton's two-pass ``ppo_loss`` with ``overwrite_logits=True``: its backward writes each block's gradient over
    the logits block it read, bit for bit the normal gradient, in the logits' own storage."""
    g = torch.Generator().manual_seed(41)
    base = torch.randn(2, 7, 300, generator=g).to(DEVICE)
    y = torch.randint(0, 300, (2, 6), generator=g).to(DEVICE)
    old, adv = (torch.randn(2, 6, generator=g) - 3).to(DEVICE), torch.randn(2, 6, generator=g).to(DEVICE)
    mask = torch.ones(2, 6, device=DEVICE)
    runs = []
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        out = rk.ppo_loss(x[:, :-1], y, old, adv, mask, entropy_coef=0.01, backend="triton",
                          overwrite_logits=overwrite)  # fmt: skip
        out.loss.backward()
        runs.append((x.grad, x.grad.data_ptr() == x.data_ptr()))
    (g0, shared0), (g1, shared1) = runs
    assert torch.equal(g0, g1) and not shared0 and shared1


def _counting(monkeypatch, module, names, counts=None):
    """Counts the calls of ``module``'s functions ``names`` (their launches) in ``counts`` (a new dict by default)."""
    counts = {} if counts is None else counts
    counts.update(dict.fromkeys(names, 0))
    for name in names:
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return counts


@pytest.mark.parametrize("path", ["fused", "two-pass"])
def test_each_path_launches_its_kernels(path, monkeypatch):
    """``fused`` (the default): the weights, one forward-with-gradient kernel and the sums, no backward kernel (the
    backward a scale); without a gradient the forward kernel between the same weights and sums;
    ``two-pass`` (and ``overwrite_logits=True``): the forward kernel, then the backward kernel."""
    from rlhf_kernels.triton import aggregate as triton_aggregate
    from rlhf_kernels.triton import ppo as triton_ppo

    monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", path)
    counts = _counting(monkeypatch, triton_ppo, ("ppo_fused_fwd", "ppo_term_fwd", "ppo_term_bwd"))
    _counting(monkeypatch, triton_aggregate, ("loss_weights", "loss_sums"), counts)
    calls = counts.copy

    def expect(fused=0, fwd=0, bwd=0, agg=None):
        agg = fused if agg is None else agg
        assert calls() == {"ppo_fused_fwd": fused, "ppo_term_fwd": fwd, "ppo_term_bwd": bwd, "loss_weights": agg,
                           "loss_sums": agg}
        counts.update(dict.fromkeys(counts, 0))

    x, y, old, adv, mask, ref = _inputs(2, 3, 40, torch.float32, seed=27)
    _run(rk.ppo_loss, x, (y, old, adv, mask), dict(ref_logp=ref, kl_coef=0.1, backend="triton"), 1.0)
    expect(fused=1) if path == "fused" else expect(fwd=1, bwd=1)
    base = x.detach().clone().requires_grad_()
    rk.ppo_loss(base * 1.0, y, old, adv, mask, backend="triton", overwrite_logits=True).loss.backward()
    expect(fwd=1, bwd=1)
    with torch.no_grad():  # no gradient: the forward kernel and the aggregation kernels, on either path
        rk.ppo_loss(x, y, old, adv, mask, backend="triton")
    expect(fwd=1, agg=1)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "view of the base"])
@pytest.mark.parametrize("V", [97, 112])  # the ALIGNED_BODY walk; the plain one (rows of whole 16-byte vectors)
def test_fused_and_two_pass_agree(dtype, layout, V, monkeypatch):
    """The same per-token statistics bit for bit (one forward code), and the gradient within the rounding of the
    weights (``aggregation_weights`` against autograd's gradient of the aggregation), every element written: over
    every ``loss_agg``, with a reference, the dual clip, an entropy bonus, ignored targets and T != 1; through
    ``logits[:, :-1]`` of a leaf the gradient lands in its base."""
    runs = {}
    for path in ("fused", "two-pass"):
        monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", path)
        for loss_agg in reference.LOSS_AGG_MODES:
            g = torch.Generator().manual_seed(28)
            base = make_logits((3, 6, V), dtype, seed=28)
            y = make_targets((3, 5), V, seed=28)
            old = (torch.randn(3, 5, generator=g) * 0.5 - 4).to(DEVICE)
            adv = torch.randn(3, 5, generator=g).to(DEVICE)
            mask = (torch.rand(3, 5, generator=g) > 0.3).to(DEVICE)
            ref = (old + 0.2 * torch.randn(3, 5, generator=g).to(DEVICE))
            leaf = base.clone().requires_grad_()
            x = leaf[:, :-1] if layout == "view of the base" else leaf[:, :-1].detach().contiguous().requires_grad_()
            with poisoned_outputs():
                out = rk.ppo_loss(x, y, old, adv, mask, ref_logp=ref, kl_coef=0.2, kl_estimator="k2",
                                  entropy_coef=0.05, clip_high=0.28, dual_clip=2.5, temperature=0.7, loss_agg=loss_agg,
                                  backend="triton")
                (out.loss * 1.5).backward()
            runs[path, loss_agg] = (out, leaf.grad if layout == "view of the base" else x.grad)
    for loss_agg in reference.LOSS_AGG_MODES:
        (a, ga), (b, gb) = runs["fused", loss_agg], runs["two-pass", loss_agg]
        for name in ("logp", "entropy", "kl"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (loss_agg, name)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.clip_frac, b.clip_frac, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.approx_kl, b.approx_kl, rtol=1e-6, atol=1e-7)
        assert ga.dtype == dtype and torch.isfinite(ga).all()
        tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
        torch.testing.assert_close(ga.float(), gb.float(), **tol)
        if layout == "view of the base":
            assert (ga[:, -1] == 0).all()


def test_fused_op_under_opcheck():
    """``ppo_loss_fused`` on the Triton backend: schema, fake tensors, autograd registration, AOT dispatch; whole rows,
    a row range of a base, and the forward without a gradient."""
    x, y, old, adv, mask, ref = _inputs(2, 3, 40, torch.float32, seed=29)
    scal = (0.8, -100, 0.1, "k3", 0.01, 0.2, 0.3, 2.5, "seq-mean-token-mean", 0, "triton")
    torch.library.opcheck(ppo_ops.ppo_loss_fused, (x.clone().requires_grad_(), y, old, adv, ref, mask) + scal)
    base = torch.cat([x, x[:, :1]], 1)
    torch.library.opcheck(ppo_ops.ppo_loss_fused,
                          (base.clone().requires_grad_(), y, old, adv, None, mask) + scal + (0, 3))
    from rlhf_kernels.ops._checks import WHOLE

    # without a gradient (no_grad calls): the forward kernel between the aggregation kernels, no dlogits
    torch.library.opcheck(ppo_ops.ppo_loss_fused, (x, y, old, adv, ref, mask) + scal + (0, WHOLE, False, False))


def test_fused_backward_scales_by_the_upstream_gradient_and_may_run_again_on_the_cpu():
    """The backward scales the forward's gradient by the upstream one; on the CPU the kept gradient stays for a
    retained graph's second backward (ops/_forward_grads.py; on a GPU it is handed over once)."""
    x, y, old, adv, mask, ref = _inputs(2, 3, 40, torch.float32, seed=30)
    leaf = x.clone().requires_grad_()
    out = rk.ppo_loss(leaf, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, backend="triton")
    (g1,) = torch.autograd.grad(out.loss * 3.0, leaf, retain_graph=True)
    (g2,) = torch.autograd.grad(out.loss, leaf)
    torch.testing.assert_close(g1, 3.0 * g2)


def test_a_bad_triton_ppo_setting_is_named(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", "one-pass")
    x, y, old, adv, mask, _ = _inputs(1, 2, 20, torch.float32, seed=31)
    with pytest.raises(ValueError, match="RLHF_KERNELS_TRITON_PPO must be one of"):
        rk.ppo_loss(x.clone().requires_grad_(), y, old, adv, mask, backend="triton")


@pytest.mark.parametrize("loss_agg", reference.LOSS_AGG_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_without_a_gradient(loss_agg, dtype):
    """``ppo_loss`` under ``no_grad`` (reference / old-policy passes, evaluation): the forward kernel between the
    aggregation kernels gives the oracle's loss, statistics and means, and the with-gradient call's to float32
    rounding."""
    x, y, old, adv, mask, ref = _inputs(3, 5, 70, dtype, seed=33, strided=True)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01, clip_high=0.28, dual_clip=2.0,
                  temperature=0.9, loss_agg=loss_agg)
    with torch.no_grad(), poisoned_outputs():
        out = rk.ppo_loss(x, y, old, adv, mask, backend="triton", **kwargs)
    with_grad = rk.ppo_loss(x.detach().clone().requires_grad_(), y, old, adv, mask, backend="triton", **kwargs)
    out64 = reference.ppo_loss(x.double(), y, old, adv, mask, **kwargs)
    outl = reference.ppo_loss(x, y, old, adv, mask, **kwargs)
    for name in ("loss", "logp", "entropy", "kl", "approx_kl"):
        assert_rule(name, getattr(out, name), getattr(outl, name), getattr(out64, name), dtype)
    torch.testing.assert_close(out.clip_frac.double(), out64.clip_frac, atol=1.01 / mask.numel(), rtol=0)
    for name in ("loss", "logp", "entropy", "kl", "clip_frac", "approx_kl"):  # (the kernels' row walks may group
        # a row's sums differently: the fused one's follows the gradient's alignment too)
        torch.testing.assert_close(getattr(out, name), getattr(with_grad, name).detach(), rtol=1e-5, atol=1e-5)
    assert not out.loss.requires_grad
