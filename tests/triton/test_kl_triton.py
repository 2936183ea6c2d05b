"""Exact KL (Triton, and the C++ CPU kernel where the tensors are on the CPU) and the Triton k1/k2/k3
estimators vs the float64 oracle; custom-op checks. The CPU kernel's multi-chunk cases (V > 2048) are in
tests/ops/test_kl.py."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext, reference
from rlhf_kernels.ops import kl as kl_ops
from triton_testutils import DEVICE, DTYPES, assert_rule, make_logits, poisoned_outputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# The exact-KL kernels under test: Triton, and the C++ CPU kernel when the tensors live on the CPU.
BACKENDS = ["triton"] + (["cpu"] if torch.device(DEVICE).type == "cpu" and _ext.available() else [])


def _oracle(x, r, temperature, mask, g, *, op_torch=False, ref_grad=True):
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_(ref_grad)
    if op_torch:
        kl = rk.kl_divergence(x, r, temperature=temperature, mask=mask, backend="torch")
    else:
        kl = reference.kl_divergence(x, r, temperature=temperature, mask=mask)
    (kl.double() * g.double()).sum().backward()
    return kl.detach(), x.grad, r.grad


def _check(x, r, *, temperature=1.0, mask=None, seed=0, op_torch=False, ref_grad=True, backend="triton"):
    dtype = x.dtype
    g = torch.randn(x.shape[:-1], generator=torch.Generator().manual_seed(seed)).to(x.device)
    xt = x.detach().clone().requires_grad_()
    rt = r.detach().clone().requires_grad_(ref_grad)
    with poisoned_outputs():
        kl = rk.kl_divergence(xt, rt, temperature=temperature, mask=mask, backend=backend)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(shape, dtype, backend):
    x = make_logits(shape, dtype, seed=shape[-1])
    # a nearby reference policy: a realistic (small) KL
    r = (x.float() + make_logits(shape, torch.float32, seed=shape[-1] + 1, scale=0.5)).to(dtype)
    _check(x, r, temperature=0.9, seed=shape[-1], ref_grad=shape[-1] != 65, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_mask_and_mixed_dtypes(backend):
    full = make_logits((2, 5, 80), torch.float32, seed=1)
    x = full[:, :-1]
    r = make_logits((2, 5, 80), torch.float32, seed=2)[:, 1:]
    mask = torch.rand(2, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.3
    _check(x, r, mask=mask, seed=1, backend=backend)
    out = rk.kl_divergence(x, r.to(torch.bfloat16), backend=backend)
    ref = reference.kl_divergence(x.double(), r.to(torch.bfloat16).double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_rows_and_shifted_rows_give_zero(backend):
    x = make_logits((3, 200), torch.float32, seed=4, scale=100.0)
    r = x.clone()
    r[1] += 37.0  # softmax is shift invariant
    kl = rk.kl_divergence(x, r, backend=backend)
    assert kl.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    x = make_logits((4, 130), torch.float32, seed=5, scale=1e4)
    r = make_logits((4, 130), torch.float32, seed=6, scale=1e4)
    x[1], r[1] = 2.0, -3.0  # all-equal rows
    x[2, ::4] = float("-inf")
    r[2, ::4] = float("-inf")  # the same masked vocabulary
    r[3, 0:60] = float("-inf")  # q = 0 where p > 0: KL = +inf
    x[3, 60:] = float("-inf")
    x[3, 10] = 5.0
    kl = rk.kl_divergence(x, r, backend=backend)
    ref = reference.kl_divergence(x.double(), r.double())
    assert kl[3].item() == float("inf") and ref[3].item() == float("inf")
    _check(x[:3], r[:3], seed=5, op_torch=True, backend=backend)


# The interpreter walks rows in 64-wide blocks, so V = 300 is five blocks: the block-max forward
# raises its scalar maxima (and rescales the lane sums) in later blocks.
_INF = float("inf")


def _fwd(x, r, temperature=1.0, backend="triton"):
    """``(kl, lse_z, lse_r)`` of ``backend``'s forward (Triton's outputs poisoned first), float64 on the CPU."""
    with poisoned_outputs():
        out = kl_ops.kl_divergence_fwd(x[None], r[None], temperature, backend)
    return [t[0].double().cpu() for t in out]


def _lse64(x, temperature):
    return torch.logsumexp(x.double().cpu() / temperature, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxima_raised_in_later_blocks(dtype, backend):
    x = make_logits((4, 300), torch.float32, seed=11)
    r = (x + make_logits((4, 300), torch.float32, seed=12, scale=1.0)).clone()
    ramp = torch.linspace(0.0, 12.0, 300, device=DEVICE)
    x[0] += ramp  # policy max raised in every block
    r[0] -= ramp  # reference max stays in block 0
    x[1, 200] += 15.0  # policy max in block 3, reference max in block 1, then raised in block 4
    r[1, 70] += 12.0
    r[1, 260] += 20.0
    x[2, 150] += 9.0  # the same shape of raise for both rows, in different blocks
    r[2, 40] += 9.0
    x[3, 290] += 200.0  # raises so large the earlier lane sums underflow to 0 when rescaled
    r[3, 100] += 150.0
    _check(x.to(dtype), r.to(dtype), temperature=0.8, seed=11, backend=backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_rows_with_late_maxima_give_exact_zero(dtype, backend):
    x = make_logits((3, 300), torch.float32, seed=13)
    x[:, 250] += 10.0
    x[1] += torch.linspace(0.0, 8.0, 300, device=DEVICE)
    x = (x * 2).round() / 2  # halves below 32: x and x + 64 are exact in every dtype
    x[2, :100] = float("-inf")
    x = x.to(dtype)
    r = x.clone()
    r[1] += 64.0
    assert torch.equal(r[1].double() - 64.0, x[1].double())
    kl = rk.kl_divergence(x, r, temperature=0.7, backend=backend)
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_prefix_rows(backend):
    x = make_logits((4, 300), torch.float32, seed=14)
    r = make_logits((4, 300), torch.float32, seed=15)
    x[0, :130], r[0, :70] = float("-inf"), float("-inf")  # first blocks empty, q = 0 only where p = 0
    x[1, :200] = float("-inf")
    x[2, :192], r[2, :192] = float("-inf"), float("-inf")  # three empty blocks in both rows
    x[3, :64], r[3, :64] = float("-inf"), float("-inf")
    x[3, 64:] -= 40.0  # then a low start, raised later
    x[3, 280] = 5.0
    _check(x, r, temperature=0.9, seed=14, backend=backend)
    _, lse_z, lse_r = _fwd(x, r, 0.9, backend)
    torch.testing.assert_close(lse_z, _lse64(x, 0.9), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_r, _lse64(r, 0.9), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_inf_rows(backend):
    x = make_logits((3, 130), torch.float32, seed=16)
    r = make_logits((3, 130), torch.float32, seed=17)
    x[0], r[0] = float("-inf"), float("-inf")
    x[1] = float("-inf")
    r[2] = float("-inf")
    kl, lse_z, lse_r = _fwd(x, r, 1.0, backend)
    ref = reference.kl_divergence(x.double(), r.double())
    assert torch.isnan(ref).all() and torch.isnan(kl).all()  # no softmax of an all -inf row
    assert lse_z.tolist()[:2] == [-_INF, -_INF] and lse_r.tolist()[0] == lse_r.tolist()[2] == -_INF
    torch.testing.assert_close(lse_z[2], _lse64(x, 1.0)[2])
    torch.testing.assert_close(lse_r[1], _lse64(r, 1.0)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_zero_where_p_positive_gives_inf(backend):
    x = make_logits((5, 300), torch.float32, seed=18)
    r = make_logits((5, 300), torch.float32, seed=19)
    x[0, 210], r[0, 210] = 4.0, float("-inf")  # in a late block
    r[1, :64] = float("-inf")  # the whole first reference block: +inf u before any reference max,
    x[1, :32] = float("-inf")  # (lanes with no policy mass yet must not turn it into NaN)
    x[1, 250] = 12.0  # carried through later raises of both maxima
    r[1, 100] = 9.0
    x[2, 5::7], r[2, 5::7] = float("-inf"), float("-inf")  # q = 0 only where p = 0: finite
    r[2, 6::11] = float("-inf")
    x[2, 6::11] = -1000.0  # p underflows to 0 even in float64: those terms are 0, not NaN
    x[3, :64], r[3, :64] = -1000.0, float("-inf")  # a block of live p where q = 0, ...
    x[3, 64:] += 10.0  # ... then a raise that underflows their rescale: finite (reference too)
    r[4, 290] = float("-inf")
    x[4, 290] = x[4].max() + 1.0  # at the policy max, in the last (partial) block
    kl, lse_z, lse_r = _fwd(x, r, 0.8, backend)
    ref = reference.kl_divergence(x.double(), r.double(), temperature=0.8)
    assert kl[[0, 1, 4]].tolist() == ref[[0, 1, 4]].tolist() == [_INF] * 3
    assert torch.isfinite(ref[2:4]).all()
    assert_rule("kl", kl[2:4], reference.kl_divergence(x[2:4], r[2:4], temperature=0.8), ref[2:4], torch.float32)
    torch.testing.assert_close(lse_z, _lse64(x, 0.8), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_r, _lse64(r, 0.8), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_masked_rows_of_infinite_kl_have_zero_gradients(backend):
    """A masked row whose KL is infinite (p > 0 where q = 0) adds 0 to the loss and 0 to both gradients, on every
    backend and in the oracle, rather than 0·inf = NaN (that NaN would reach every weight behind the logits)."""
    x = make_logits((4, 300), torch.float32, seed=22)
    r = make_logits((4, 300), torch.float32, seed=23)
    r[0, 210] = float("-inf")  # q = 0 where p > 0: KL = inf (a late block)
    r[3, :64] = float("-inf")  # (the whole first block)
    mask = torch.tensor([False, True, True, False], device=DEVICE)
    assert torch.isinf(reference.kl_divergence(x.double(), r.double())[[0, 3]]).all()
    xt, rt = x.clone().requires_grad_(), r.clone().requires_grad_()
    with poisoned_outputs():
        kl = rk.kl_divergence(xt, rt, mask=mask, backend=backend)
        (kl * torch.tensor([0.5, -1.0, 2.0, 1.5], device=DEVICE)).sum().backward()
    assert kl[[0, 3]].tolist() == [0.0, 0.0]
    for grad in (xt.grad, rt.grad):
        assert torch.isfinite(grad).all() and torch.equal(grad[[0, 3]], torch.zeros_like(grad[[0, 3]]))
    _check(x, r, mask=mask, seed=5, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_row(backend):
    x = make_logits((6, 300), torch.float32, seed=20)
    r = make_logits((6, 300), torch.float32, seed=21)
    x[0, 230] = float("nan")  # policy row, late block
    r[1, 3] = float("nan")  # reference row, first block
    x[2, 17] = float("-inf")
    r[2, 17] = float("nan")  # where p = 0: still NaN (the reference row has no softmax)
    x[3, 100] = -1000.0
    r[3, 100] = float("nan")  # where p underflows
    x[4, 0] = float("nan")  # the first element, before any max
    g = torch.randn(6, generator=torch.Generator().manual_seed(20)).to(DEVICE)
    xt, rt = x.clone().requires_grad_(), r.clone().requires_grad_()
    with poisoned_outputs():
        kl = rk.kl_divergence(xt, rt, temperature=1.3, backend=backend)
        (kl * g).sum().backward()
    ref = reference.kl_divergence(x.double(), r.double(), temperature=1.3)
    assert torch.isnan(kl).tolist() == torch.isnan(ref).tolist() == [True] * 5 + [False]
    _, lse_z, lse_r = _fwd(x, r, 1.3, backend)
    assert torch.isnan(lse_z).tolist() == [True, False, False, False, True, False]
    assert torch.isnan(lse_r).tolist() == [False, True, True, True, False, False]
    kl5, dx5, dr5 = _oracle(x[5:].double(), r[5:].double(), 1.3, None, g[5:])
    assert_rule("kl", kl[5:], reference.kl_divergence(x[5:], r[5:], temperature=1.3), kl5, torch.float32)
    torch.testing.assert_close(xt.grad[5:].double(), dx5, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rt.grad[5:].double(), dr5, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_with_temperature(backend):
    g = torch.Generator().manual_seed(22)
    base = torch.randn(4, 300, generator=g) * 3
    x = base + 1e4  # |z| ~ 1.4e4 at T = 0.7, moderate KL
    r = base + torch.randn(4, 300, generator=g) - 2e4
    x[1] = torch.randn(300, generator=g) * 1e4  # spread 1e4: nearly one-hot
    r[1] = x[1] + torch.randn(300, generator=g) * 30
    x[2, 260] += 20.0  # late raises on top of the offsets
    r[2, 80] += 25.0
    x[3] = -x[3]
    x, r = x.to(DEVICE), r.to(DEVICE)
    _check(x, r, temperature=0.7, seed=22, op_torch=True, backend=backend)
    kl, lse_z, lse_r = _fwd(x, r, 0.7, backend)
    # x - max x is exact, so the forward is far inside the fp32 reference's error (~1e-3 here),
    # which scales the logits first; scaling first in the kernel fails this
    ref = reference.kl_divergence(x.double(), r.double(), temperature=0.7).cpu()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_z, _lse64(x, 0.7), rtol=1e-6, atol=0.0)
    torch.testing.assert_close(lse_r, _lse64(r, 0.7), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_low_precision_logits(dtype, backend):
    ulp = {torch.bfloat16: 256.0, torch.float16: 32.0}[dtype]  # spacing from 3.3e4 to 6.5e4
    g = torch.Generator().manual_seed(23)
    base = torch.randn(3, 300, generator=g) * 3 * ulp
    x = base + 6.0e4  # fp16 near overflow
    r = base + torch.randn(3, 300, generator=g) * ulp - 4e4
    x[1] = -x[1]
    x[2, 270] += 6 * ulp  # a late raise
    x = x.clamp(-65504.0, 65504.0).to(dtype).to(DEVICE)
    r = r.to(dtype).to(DEVICE)
    temperature = ulp / 2  # neighbouring values 2 nats apart: p is spread, not one-hot
    _check(x, r, temperature=temperature, seed=23, op_torch=True, backend=backend)
    kl, _, _ = _fwd(x, r, temperature, backend)
    ref = reference.kl_divergence(x.double(), r.double(), temperature=temperature).cpu()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)  # as in test_large_logits_with_temperature


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


def test_k1_gradient_at_an_infinite_log_ratio():
    """k1 = logp - ref has the constant derivatives (1, -1), also where logp = -inf (a target of probability 0);
    the kernel's derivative was ``d·0 + 1``, NaN there."""
    logp = torch.tensor([-1.0, float("-inf"), -2.5], device=DEVICE, requires_grad=True)
    ref = torch.tensor([-1.5, -0.7, float("-inf")], device=DEVICE, requires_grad=True)
    grad = torch.tensor([0.3, -1.2, 2.0], device=DEVICE)
    out = rk.kl_estimate(logp, ref, "k1", backend="triton")
    (out * grad).sum().backward()
    assert out[1] == float("-inf") and out[2] == float("inf")
    torch.testing.assert_close(logp.grad, grad)
    torch.testing.assert_close(ref.grad, -grad)


def test_k3_gradient_where_the_reference_log_prob_is_minus_inf():
    """k3's derivative -expm1(d) is 1 at d = ref - logp = -inf (a sampled token the reference policy excludes), as
    the oracle's autograd gives; the kernel took it as -(d + expm1_minus_x(d)) = -(-inf + inf), NaN there."""
    logp = torch.tensor([-1.0, -2.5, -0.3, -4.0], device=DEVICE, requires_grad=True)
    ref = torch.tensor([float("-inf"), -2.4, float("-inf"), -90.0], device=DEVICE, requires_grad=True)
    grad = torch.tensor([0.3, -1.2, 2.0, 0.7], device=DEVICE)
    out = rk.kl_estimate(logp, ref, "k3", backend="triton")
    (out * grad).sum().backward()
    x64, r64 = logp.detach().double().requires_grad_(), ref.detach().double().requires_grad_()
    (reference.kl_estimate(x64, r64, "k3") * grad.double()).sum().backward()
    assert out[0] == float("inf") and out[2] == float("inf")
    torch.testing.assert_close(logp.grad.double(), x64.grad, rtol=1e-5, atol=0)
    torch.testing.assert_close(ref.grad.double(), r64.grad, rtol=1e-5, atol=0)


def test_k3_is_accurate_near_zero():
    logp = -torch.rand(1000, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    ref = logp + torch.logspace(-4, -1, 1000).to(DEVICE)
    out = rk.kl_estimate(logp, ref, "k3", backend="triton").double()
    exact = reference.kl_estimate(logp.double(), ref.double(), "k3")
    assert ((out - exact).abs() / exact).max().item() < 1e-3


def test_default_backend_on_cpu():
    """CPU tensors: the exact KL runs the C++ kernel when the extension is built (else the reference), the
    estimator the reference; both agree with the reference."""
    a, b = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(rk.kl_estimate(a, b), reference.kl_estimate(a, b))
    x, r = torch.randn(2, 9), torch.randn(2, 9)
    torch.testing.assert_close(rk.kl_divergence(x, r), reference.kl_divergence(x, r))


@pytest.mark.parametrize("backend", ["triton", "torch"] + (["cpu"] if torch.device(DEVICE).type == "cpu" and _ext.available() else []))
def test_opcheck(backend):
    x = make_logits((2, 3, 40), torch.float32, seed=9)
    r = make_logits((2, 3, 40), torch.float32, seed=10)
    torch.library.opcheck(kl_ops.kl_divergence_fwd, (x.requires_grad_(), r.requires_grad_(), 0.8, backend))
    kl, lz, lr = kl_ops.kl_divergence_fwd(x.detach(), r.detach(), 0.8, backend)
    for need in (True, False):
        torch.library.opcheck(kl_ops.kl_divergence_bwd, (torch.randn_like(kl), x.detach(), r.detach(), kl, lz, lr, 0.8, need, backend))
    if backend == "cpu":
        return  # the estimators have no cpu kernel
    a = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(kl_ops.kl_estimate_fwd, (a, b, "k3", 1.5, backend))
    torch.library.opcheck(kl_ops.kl_estimate_bwd, (torch.randn(4, 5, device=DEVICE), a.detach(), b.detach(), "k2", None, backend))


def test_gradcheck_torch_backend_float64():
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rk.kl_divergence(a, b, temperature=0.7, backend="torch"), (x, r))


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "view"])
@pytest.mark.parametrize("ref_grad", [False, True], ids=["frozen-ref", "trained-ref"])
def test_overwrite_logits_writes_the_gradient_over_them(backend, sliced, ref_grad):
    """``kl_divergence(overwrite_logits=True)``: the backward writes dlogits over the logits (their base for a
    ``[:, :-1]`` view, whose other rows become zeros), bit for bit the gradient of a normal call, adopted as
    ``.grad`` without a copy; the version counter moves; the reference's gradient, when it has one, is the same
    new tensor as without the flag, and the reference itself is left as it was."""
    base = make_logits((2, 6, 300), torch.bfloat16, seed=41)
    ref = make_logits((2, 5 if sliced else 6, 300), torch.bfloat16, seed=42)
    g = torch.randn(ref.shape[:-1], generator=torch.Generator().manual_seed(43)).to(base.device)
    runs = []
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        r = ref.clone().requires_grad_(ref_grad)
        version = x._version
        kl = rk.kl_divergence(x[:, :-1] if sliced else x, r, temperature=0.9, backend=backend,
                              overwrite_logits=overwrite)  # fmt: skip
        (kl * g).sum().backward()
        runs.append((kl, x.grad, x.grad.data_ptr() == x.data_ptr(), x._version != version, x.detach(), r.grad,
                     r.detach()))
    (kl0, g0, shared0, moved0, _, dr0, _), (kl1, g1, shared1, moved1, x1, dr1, r1) = runs
    assert torch.equal(kl0, kl1) and torch.equal(g0, g1)
    assert not shared0 and not moved0
    assert shared1 and moved1 and torch.equal(x1, g1)
    if sliced:
        assert torch.equal(x1[:, -1], torch.zeros_like(x1[:, -1]))
    assert torch.equal(r1, ref)
    if ref_grad:
        assert torch.equal(dr0, dr1) and dr1.data_ptr() != r1.data_ptr()
    else:
        assert dr0 is None and dr1 is None


def test_overwrite_logits_is_left_alone_where_it_cannot_or_must_not_write():
    """No gradient, a non-contiguous base, or a reference in the logits' own memory: the logits keep their values
    and the gradient is a new tensor. A backward that saved the logits raises after they were overwritten."""
    x = make_logits((2, 4, 50), torch.float32, seed=44)
    r = make_logits((2, 4, 50), torch.float32, seed=45)
    before = x.clone()
    with torch.no_grad():
        rk.kl_divergence(x, r, overwrite_logits=True)
    assert torch.equal(x, before)
    xt = make_logits((4, 2, 50), torch.float32, seed=46).transpose(0, 1).requires_grad_()  # not contiguous
    rk.kl_divergence(xt, r, overwrite_logits=True).sum().backward()
    assert xt.grad.data_ptr() != xt.data_ptr()
    both = make_logits((2, 5, 50), torch.float32, seed=47).requires_grad_()
    kept = both.detach().clone()
    rk.kl_divergence(both[:, 1:], both[:, :-1].detach(), overwrite_logits=True).sum().backward()  # ref in its memory
    assert torch.equal(both.detach(), kept) and both.grad.data_ptr() != both.data_ptr()
    h = x.clone().requires_grad_() * 1.0
    side = h.pow(2).sum()  # saves h; created first, so its backward runs after the KL's
    kl = rk.kl_divergence(h, r, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (kl.sum() + side).backward()
    with pytest.raises(TypeError, match="overwrite_logits must be True or False"):
        rk.kl_divergence(x, r, overwrite_logits="yes")
