"""Triton exact KL and k1/k2/k3 estimators vs the float64 oracle; custom-op checks."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import kl as kl_ops
from triton_testutils import DEVICE, DTYPES, assert_rule, make_logits, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _oracle(x, r, temperature, mask, g, *, op_torch=False, ref_grad=True):
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_(ref_grad)
    if op_torch:
        kl = rk.kl_divergence(x, r, temperature=temperature, mask=mask, backend="torch")
    else:
        kl = reference.kl_divergence(x, r, temperature=temperature, mask=mask)
    (kl.double() * g.double()).sum().backward()
    return kl.detach(), x.grad, r.grad


def _check(x, r, *, temperature=1.0, mask=None, seed=0, op_torch=False, ref_grad=True):
    dtype = x.dtype
    g = torch.randn(x.shape[:-1], generator=torch.Generator().manual_seed(seed)).to(x.device)
    xt = x.detach().clone().requires_grad_()
    rt = r.detach().clone().requires_grad_(ref_grad)
    with poisoned_outputs():
        kl = rk.kl_divergence(xt, rt, temperature=temperature, mask=mask, backend="triton")
        (kl * g).sum().backward()
    assert kl.dtype == torch.float32
    kl64, dx64, dr64 = _oracle(x.double(), r.double(), temperature, mask, g, op_torch=op_torch, ref_grad=ref_grad)
    kll, dxl, drl = _oracle(x, r, temperature, mask, g, op_torch=op_torch, ref_grad=ref_grad)
    assert_rule("kl", kl, kll, kl64, dtype)
    assert_rule("dlogits", xt.grad, dxl, dx64, dtype)
    assert xt.grad.dtype == dtype
    if ref_grad:
        assert_rule("dref_logits", rt.grad, drl, dr64, dtype)
    else:
        assert rt.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (2, 3, 300), (5, 65)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    x = make_logits(shape, dtype, seed=shape[-1])
    # a nearby reference policy: a realistic (small) KL
    r = (x.float() + make_logits(shape, torch.float32, seed=shape[-1] + 1, scale=0.5)).to(dtype)
    _check(x, r, temperature=0.9, seed=shape[-1], ref_grad=shape[-1] != 65)


def test_strided_mask_and_mixed_dtypes():
    full = make_logits((2, 5, 80), torch.float32, seed=1)
    x = full[:, :-1]
    r = make_logits((2, 5, 80), torch.float32, seed=2)[:, 1:]
    mask = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.3
    _check(x, r, mask=mask, seed=1)
    out = rk.kl_divergence(x, r.to(torch.bfloat16), backend="triton")
    ref = reference.kl_divergence(x.double(), r.to(torch.bfloat16).double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_equal_rows_and_shifted_rows_give_zero():
    x = make_logits((3, 200), torch.float32, seed=4, scale=100.0)
    r = x.clone()
    r[1] += 37.0  # softmax is shift invariant
    kl = rk.kl_divergence(x, r, backend="triton")
    assert kl.abs().max().item() < 1e-5


def test_extreme_logits():
    x = make_logits((4, 130), torch.float32, seed=5, scale=1e4)
    r = make_logits((4, 130), torch.float32, seed=6, scale=1e4)
    x[1], r[1] = 2.0, -3.0  # all-equal rows
    x[2, ::4] = float("-inf")
    r[2, ::4] = float("-inf")  # the same masked vocabulary
    r[3, 0:60] = float("-inf")  # q = 0 where p > 0: KL = +inf
    x[3, 60:] = float("-inf")
    x[3, 10] = 5.0
    kl = rk.kl_divergence(x, r, backend="triton")
    ref = reference.kl_divergence(x.double(), r.double())
    assert kl[3].item() == float("inf") and ref[3].item() == float("inf")
    _check(x[:3], r[:3], seed=5, op_torch=True)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("clamp", [None, 0.3])  # 0.3: no exact ties at the clamp in any dtype
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_estimate(estimator, clamp, dtype):
    g = torch.Generator().manual_seed(7)
    logp = (-torch.rand(3, 67, generator=g) * 4).to(dtype).to(DEVICE)
    spread = torch.logspace(-6, 0.5, 67).to(DEVICE)
    ref = (logp.float() + torch.randn(3, 67, generator=g).to(DEVICE) * spread).to(dtype)
    grad = torch.randn(3, 67, generator=g).to(DEVICE)
    a, b = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    with poisoned_outputs():
        out = rk.kl_estimate(a, b, estimator, clamp, backend="triton")
        (out.float() * grad).sum().backward()
    assert out.dtype == dtype and a.grad.dtype == dtype

    def oracle(x, y):
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        k = reference.kl_estimate(x, y, estimator, clamp)
        (k.double() * grad.double()).sum().backward()
        return k.detach(), x.grad, y.grad

    k64, da64, db64 = oracle(logp.double(), ref.double())
    kl_, dal, dbl = oracle(logp, ref)
    assert_rule("kl", out, kl_, k64, dtype)
    assert_rule("dlogp", a.grad, dal, da64, dtype)
    assert_rule("dref", b.grad, dbl, db64, dtype)


def test_k3_is_accurate_near_zero():
    logp = -torch.rand(1000, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ref = logp + torch.logspace(-4, -1, 1000).to(DEVICE)
    out = rk.kl_estimate(logp, ref, "k3", backend="triton").double()
    exact = reference.kl_estimate(logp.double(), ref.double(), "k3")
    assert ((out - exact).abs() / exact).max().item() < 1e-3


def test_default_backend_on_cpu_is_reference():
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(rk.kl_estimate(a, b), reference.kl_estimate(a, b))
    x, r = torch.randn(2, 9), torch.randn(2, 9)
    torch.testing.assert_close(rk.kl_divergence(x, r), reference.kl_divergence(x, r))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck(backend):
    x = make_logits((2, 3, 40), torch.float32, seed=9)
    r = make_logits((2, 3, 40), torch.float32, seed=10)
    torch.library.opcheck(kl_ops.kl_divergence_fwd, (x.requires_grad_(), r.requires_grad_(), 0.8, backend))
    kl, lz, lr = kl_ops.kl_divergence_fwd(x.detach(), r.detach(), 0.8, backend)
    for need in (True, False):
        torch.library.opcheck(kl_ops.kl_divergence_bwd, (torch.randn_like(kl), x.detach(), r.detach(), kl, lz, lr, 0.8, need, backend))
    a = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kl_ops.kl_estimate_fwd, (a, b, "k3", 1.5, backend))
    torch.library.opcheck(kl_ops.kl_estimate_bwd, (torch.randn(4, 5, device=DEVICE), a.detach(), b.detach(), "k2", None, backend))


def test_gradcheck_torch_backend_float64():
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rk.kl_divergence(a, b, temperature=0.7, backend="torch"), (x, r))
