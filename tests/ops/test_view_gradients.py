"""Slices ``base[:, a:a+T]`` of ``[B, L, V]`` logits: the gradient goes straight to ``base``.

``rk.logprobs`` / ``rk.ppo_loss`` / ``rk.kl_divergence`` detect (eager mode only) that
``logits`` is such a slice and call their custom op with ``base`` and the row range,
so the backward writes a ``[B, L, V]`` gradient itself (rows outside the range
zeroed) instead of autograd's SliceBackward zero-filling ``[B, L, V]`` and copying
the ``[B, T, V]`` gradient into it. Checked here for every backend that runs on the
CPU (``cpu``, ``torch``, ``triton`` under ``TRITON_INTERPRET=1``):

- gradients through ``base[:, :-1]``, ``base[:, 1:]``, ``base[:, 1:-1]`` equal those of
  the contiguous path bit for bit (Triton: to float32 rounding, its forwards' sums
  grouped by the rows' alignment), with every element written (NaN-poisoned
  allocations) and the dropped rows exactly zero;
- no ``slice_backward`` and no ``[B, L, V]``-sized zero fill in the backward
  (a dispatch mode records the ops; the fallback path is the negative control);
- float64 ``gradcheck`` through the view (``torch`` / ``cpu``), ``opcheck`` of the ops
  with the new ``row_start`` / ``row_count`` arguments, ``torch.compile(fullgraph=True)``;
- the cases that must fall back (and still be right): no grad, ``retain_grad`` on the
  view, a view made under ``no_grad``, a non-slice view, a 2-D base; autograd corner
  cases: non-leaf base, views of views, in-place on ``base`` before / after the call.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels.ops import kl as kl_ops
from rlhf_kernels.ops import logprobs as lp_ops
from rlhf_kernels.ops import ppo as ppo_ops
from rlhf_kernels.ops._checks import WHOLE, slice_of_base
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.poison import poisoned_allocations

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

_TRITON = triton_importable() and triton_interpreting()
BACKENDS = (["cpu"] if _ext.available() else []) + ["torch"] + (["triton"] if _TRITON else [])
KL_BACKENDS = (["cpu"] if _ext.available() else []) + ["torch"] + (["triton"] if _TRITON else [])
SLICES = {"[:-1]": slice(None, -1), "[1:]": slice(1, None), "[1:-1]": slice(1, -1)}


def _inputs(B, L, V, T, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, L, V, generator=g) * 2).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0] = -100
    old = torch.randn(B, T, generator=g) * 0.5 - 3
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    ref = old + torch.randn(B, T, generator=g) * 0.1
    return base, y, old, adv, mask, ref


def _loss(op, x, y, old, adv, mask, ref, backend, ref_x=None):
    """A scalar using every output of ``op`` that carries a gradient (weights make each count)."""
    if op == "logprobs":
        lp, ent = rk.logprobs(x, y, return_entropy=True, temperature=0.8, backend=backend)
        return (lp * 1.3).sum() + (ent * 0.7).sum()
    if op == "ppo_loss":
        out = rk.ppo_loss(x, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, clip_high=0.28,
                          dual_clip=3.0, temperature=0.9, loss_agg="seq-mean-token-mean", backend=backend)
        return out.loss * 2.5
    kl = rk.kl_divergence(x, ref_x, temperature=1.1, mask=mask, backend=backend)
    return (kl * torch.linspace(0.5, 1.5, kl.numel()).reshape(kl.shape)).sum()


def _view_vs_contiguous(op, backend, sl, dtype=torch.float32, B=3, L=7, V=33):
    T = len(range(L)[sl])
    base, y, old, adv, mask, ref = _inputs(B, L, V, T, dtype)
    ref_base = torch.randn(B, L, V).to(dtype) if op == "kl" else None
    # through the view of base (the rerouted path)
    x = base.clone().requires_grad_()
    r = ref_base.clone().requires_grad_() if op == "kl" else None
    with poisoned_allocations():
        loss = _loss(op, x[:, sl], y, old, adv, mask, ref, backend, None if r is None else r[:, sl])
        loss.backward()
    # through a contiguous copy of the rows (no view involved)
    c = base[:, sl].contiguous().requires_grad_()
    rc = ref_base[:, sl].contiguous().requires_grad_() if op == "kl" else None
    loss_c = _loss(op, c, y, old, adv, mask, ref, backend, rc)
    loss_c.backward()
    same = _same_bits if backend != "triton" else _same_up_to_alignment
    same(loss.detach(), loss_c.detach())
    expected = torch.zeros_like(base)
    expected[:, sl] = c.grad
    assert x.grad.shape == base.shape and x.grad.dtype == dtype
    same(x.grad, expected)
    if op == "kl":
        expected_r = torch.zeros_like(ref_base)
        expected_r[:, sl] = rc.grad
        same(r.grad, expected_r)
    dropped = torch.ones(L, dtype=torch.bool)
    dropped[sl] = False
    assert torch.all(x.grad[:, dropped] == 0)


def _same_bits(got, expected):
    assert torch.equal(got, expected), (got - expected).abs().max()


def _same_up_to_alignment(got, expected):
    """The Triton forwards group a row's sums by its 16-byte alignment where the row length or stride is odd
    (``ALIGNED_BODY``, ``triton/_common.py``), which a view and its contiguous copy need not share: the same values
    to float32 rounding, not the same bits (the backwards themselves are elementwise, the same bits)."""
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["logprobs", "ppo_loss"])
@pytest.mark.parametrize("sl", SLICES.values(), ids=SLICES.keys())
def test_view_gradient_equals_contiguous_path(op, backend, sl):
    _view_vs_contiguous(op, backend, sl)


@pytest.mark.parametrize("backend", KL_BACKENDS)
@pytest.mark.parametrize("sl", SLICES.values(), ids=SLICES.keys())
def test_kl_view_gradients_equal_contiguous_path(backend, sl):
    _view_vs_contiguous("kl", backend, sl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_view_gradient_half_dtypes(backend, dtype):
    _view_vs_contiguous("ppo_loss", backend, slice(None, -1), dtype=dtype, V=2053)


# ------------------------------------------------------------------ what the backward does


class _Recorder(TorchDispatchMode):
    """Records every aten / custom op with the shapes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]
        if func in (torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar):
            shapes = [tuple(args[0].shape)]
        self.calls.append((str(func), shapes))
        return out


def _full_size_fills(calls, shape):
    """Ops that build a zero-filled tensor of ``shape`` (what SliceBackward does) or are slice_backward itself."""
    fills = ("aten.zeros", "aten.new_zeros", "aten.zeros_like", "aten.zero_", "aten.fill_", "aten.full")
    return [
        name for name, shapes in calls
        if name.startswith("aten.slice_backward") or (name.startswith(fills) and shape in shapes)
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["logprobs", "ppo_loss", "ppo_loss-fused"])
def test_backward_has_no_full_zero_fill_or_slice_copy(op, backend, monkeypatch):
    """No [B, L, V] zero fill or slice_backward copy: the custom op writes the base-shaped gradient itself, in the
    backward, or (``ppo_loss-fused``: Triton's forward-with-gradient) in the forward, whose backward then makes none."""
    if op == "ppo_loss-fused" and backend != "triton":
        pytest.skip("the fused forward-with-gradient is Triton's (and CUDA's) route")
    if op == "ppo_loss" and backend == "triton":
        monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", "two-pass")
    B, L, V = 2, 6, 17
    base, y, old, adv, mask, ref = _inputs(B, L, V, L - 1)
    x = base.requires_grad_()
    with _Recorder() as forward:
        loss = _loss(op.split("-")[0], x[:, :-1], y, old, adv, mask, ref, backend)
    with _Recorder() as rec:
        loss.backward()
    if op == "ppo_loss-fused":
        assert any(name.startswith("rlhf_kernels.ppo_loss_fused") for name, _ in forward.calls)
        rec.calls = forward.calls + rec.calls
    names = [name for name, _ in rec.calls]
    assert any(name.startswith("rlhf_kernels.") for name in names), names
    assert _full_size_fills(rec.calls, (B, L, V)) == []
    # the custom op's gradient is [B, L, V] itself
    assert any(name.startswith("rlhf_kernels.") and (B, L, V) in shapes for name, shapes in rec.calls)

    # negative control: retain_grad on the view keeps today's path, whose SliceBackward the recorder sees
    x.grad = None
    view = x[:, :-1]
    view.retain_grad()
    loss = _loss(op.split("-")[0], view, y, old, adv, mask, ref, backend)
    with _Recorder() as rec:
        loss.backward()
    assert _full_size_fills(rec.calls, (B, L, V)) != []
    assert view.grad is not None and view.grad.shape == (B, L - 1, V)


def test_custom_op_receives_the_base_and_the_range(monkeypatch):
    seen = []
    original = lp_ops.logprobs_fwd_call

    def spy(logits, targets, *args):
        seen.append((tuple(logits.shape), args[3:5]))  # (row_start, row_count) after temperature, ignore, backend
        return original(logits, targets, *args)

    monkeypatch.setattr(lp_ops, "logprobs_fwd_call", spy)
    base = torch.randn(2, 6, 5, requires_grad=True)
    y = torch.randint(0, 5, (2, 4))
    rk.logprobs(base[:, 1:-1], y, backend="torch")
    rk.logprobs(base[:, 1:-1].contiguous(), y, backend="torch")
    with torch.no_grad():
        rk.logprobs(base[:, 1:-1], y, backend="torch")
    assert seen == [((2, 6, 5), (1, 4)), ((2, 4, 5), (0, WHOLE)), ((2, 4, 5), (0, WHOLE))]


# ------------------------------------------------------------------ detection


def test_slice_of_base_accepts_only_dim1_slices():
    base = torch.randn(3, 8, 5, requires_grad=True)
    assert slice_of_base(base[:, :-1])[1] == 0
    assert slice_of_base(base[:, 1:])[1] == 1
    assert slice_of_base(base[:, 2:5])[1] == 2
    assert slice_of_base(base[:, 1:][:, 2:-1])[1] == 3  # a view of a view: _base is the root
    for not_a_slice in (
        base,  # not a view
        base[:, ::2],  # other strides
        base[1:],  # B differs
        base[:, :-1, :4],  # V differs
        base[:, :, 1:],  # V differs, offset inside a row
        base[:, :-1].transpose(0, 1),  # other strides
        base.detach()[:, :-1],  # no grad_fn
        (base * 1).reshape(24, 5)[:12].view(3, 4, 5),  # 2-D base
        base[:, 1:1],  # empty
    ):
        assert slice_of_base(not_a_slice) is None
    with torch.no_grad():
        assert slice_of_base(base[:, :-1]) is None
        made_without_grad = base[:, :-1]
    assert slice_of_base(made_without_grad) is None  # requires_grad is True there, but no grad_fn
    plain = torch.randn(3, 8, 5)
    leaf_view = plain[:, :-1].requires_grad_()  # base does not require grad: the view is a leaf
    assert slice_of_base(leaf_view) is None
    hooked = base[:, :-1]
    hooked.register_hook(lambda g: g)
    assert slice_of_base(hooked) is None


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _ext.available() else []))
def test_fallbacks_keep_view_semantics(backend):
    base, y, *_ = _inputs(2, 6, 9, 5)
    base.requires_grad_()
    # retain_grad on the view: its .grad is filled, base.grad too
    view = base[:, :-1]
    view.retain_grad()
    rk.logprobs(view, y, backend=backend).sum().backward()
    assert view.grad is not None and torch.equal(base.grad[:, :-1], view.grad)
    # a leaf view of a base without grad: the gradient goes to the view, not the base
    plain = base.detach().clone()
    leaf = plain[:, :-1].requires_grad_()
    rk.logprobs(leaf, y, backend=backend).sum().backward()
    assert leaf.grad is not None and plain.grad is None
    torch.testing.assert_close(leaf.grad, view.grad, rtol=0, atol=0)
    # a view made under no_grad (a leaf that reports requires_grad, as in plain PyTorch): never reaches base
    with torch.no_grad():
        frozen = base[:, :-1]
    base.grad = None
    out = rk.logprobs(frozen, y, backend=backend)
    if out.requires_grad:
        out.sum().backward()
    assert base.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_corner_cases(backend):
    B, L, V = 2, 6, 11
    w, y, _old, _adv, _mask, _ref = _inputs(B, L, V, L - 2)
    w.requires_grad_()
    # the same bits, but for Triton's forwards, whose sums follow the rows' alignment (_same_up_to_alignment)
    exact = dict(rtol=0, atol=0) if backend != "triton" else dict(rtol=2e-6, atol=2e-6)

    def grads(fn):
        w.grad = None
        fn().backward()
        return w.grad.clone()

    def lp(x):
        return rk.logprobs(x, y, return_entropy=True, backend=backend)

    # non-leaf base, a view of a view, the base used elsewhere too, two slices of one base
    expected = grads(lambda: sum(t.sum() for t in lp((w * 2)[:, 1:-1].contiguous())) + (w * 2).square().sum())

    def non_leaf():
        base = w * 2
        return sum(t.sum() for t in lp(base[:, 1:][:, :-1])) + base.square().sum()

    torch.testing.assert_close(grads(non_leaf), expected, **exact)
    two = grads(lambda: lp(w[:, :-2])[0].sum() + lp(w[:, 2:])[1].sum())
    two_ref = grads(lambda: lp(w[:, :-2].contiguous())[0].sum() + lp(w[:, 2:].contiguous())[1].sum())
    torch.testing.assert_close(two, two_ref, **exact)

    # in-place on the base before the call (its grad_fn becomes CopySlices): still right
    def inplace_before(contiguous):
        base = w * 1
        base[:, 0].mul_(3)
        x = base[:, :-2]
        return lp(x.contiguous() if contiguous else x)[0].sum()

    torch.testing.assert_close(grads(lambda: inplace_before(False)), grads(lambda: inplace_before(True)), **exact)

    # in-place on the base after the call: autograd refuses, as it does for the plain view
    base = w * 1
    logp = lp(base[:, :-2])[0]
    base.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logp.sum().backward()


def test_bad_target_error_names_the_view_position():
    base = torch.randn(2, 5, 7, requires_grad=True)
    y = torch.randint(0, 7, (2, 4))
    y[1, 2] = 7
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 7"):
        rk.logprobs(base[:, 1:], y, backend="torch")
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 7"):
        rk.ppo_loss(base[:, 1:], y, torch.zeros(2, 4), torch.ones(2, 4), torch.ones(2, 4), backend="torch")


# ------------------------------------------------------------------ gradcheck, opcheck, compile


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if _ext.available() else []))
def test_gradcheck_through_the_view(backend):
    base, y, old, adv, mask, ref = _inputs(2, 5, 6, 4, torch.float64, seed=3)
    base.requires_grad_()
    y[1, 1] = -100

    def logprobs(b):
        return rk.logprobs(b[:, 1:], y, temperature=0.7, return_entropy=True, backend=backend)

    def ppo(b):
        return rk.ppo_loss(b[:, :-1], y, old.double(), adv.double(), mask, ref_logp=ref.double(), kl_coef=0.1,
                           entropy_coef=0.05, temperature=1.3, backend=backend).loss

    assert torch.autograd.gradcheck(logprobs, (base,))
    assert torch.autograd.gradcheck(ppo, (base,))
    r = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, q: rk.kl_divergence(b[:, 1:-1], q[:, :-2], temperature=0.8,
                                                                  backend=backend), (base, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_row_ranges(backend):
    B, L, V, T = 2, 6, 9, 4
    base, y, old, adv, _mask, ref = _inputs(B, L, V, T, seed=5)
    x = base.requires_grad_()
    torch.library.opcheck(lp_ops.logprobs_fwd, (x, y, 0.9, -100, backend, 1, T))
    _, ent, lse = lp_ops.logprobs_fwd(x.detach(), y, 0.9, -100, backend, 1, T)
    g = torch.randn(B, T)
    torch.library.opcheck(lp_ops.logprobs_bwd, (g, g.flip(0), x.detach(), y, lse, ent, 0.9, -100, backend, 1, T))
    if backend != "cpu":  # ppo_term has no cpu kernel (ppo_loss composes logprobs there)
        scal = (0.9, -100, 0.1, "k3", 0.01, 0.2, 0.28, 3.0, backend)
        torch.library.opcheck(ppo_ops.ppo_term_fwd, (x, y, old, adv, ref) + scal + (2, T))
        _term, logp, ent, _, _, lse = ppo_ops.ppo_term_fwd(x.detach(), y, old, adv, ref, *scal, 2, T)
        gs = [torch.randn(B, T) for _ in range(4)]
        torch.library.opcheck(ppo_ops.ppo_term_bwd, (*gs, x.detach(), y, logp, ent, lse, old, adv, ref) + scal + (2, T))
    r = torch.randn(B, L + 1, V, requires_grad=True)
    torch.library.opcheck(kl_ops.kl_divergence_fwd, (x, r, 0.8, backend, 0, T, 3, T))
    kl, lz, lr = kl_ops.kl_divergence_fwd(x.detach(), r.detach(), 0.8, backend, 0, T, 3, T)
    for need in (True, False):
        args = (torch.randn(B, T), x.detach(), r.detach(), kl, lz, lr, 0.8, need, backend, 0, T, 3, T)
        torch.library.opcheck(kl_ops.kl_divergence_bwd, args)


def test_fused_ppo_op_with_a_row_range():
    """``ppo_loss_fused`` (the CUDA forward-with-gradient contract, here its torch branch) with a range."""
    B, L, V, T = 2, 6, 13, 5
    base, y, old, adv, mask, ref = _inputs(B, L, V, T, seed=7)
    scal = (1.0, -100, 0.1, "k3", 0.01, 0.2, 0.28, None, "seq-mean-token-mean", 0, "torch")

    def fused(x, *rng):
        return ppo_ops.ppo_loss_fused(x, y, old, adv, ref, mask, *scal, *rng)

    x = base.clone().requires_grad_()
    with poisoned_allocations():
        out = fused(x, 1, T)
    assert out[6].shape == (B, L, V)
    (out[0] * 1.5).backward()
    c = base[:, 1:].contiguous().requires_grad_()
    out_c = fused(c)
    (out_c[0] * 1.5).backward()
    for a, b in zip(out[:6], out_c[:6]):
        assert torch.equal(a, b)
    expected = torch.zeros_like(base)
    expected[:, 1:] = c.grad
    assert torch.equal(x.grad, expected)
    torch.library.opcheck(ppo_ops.ppo_loss_fused, (base.clone().requires_grad_(), y, old, adv, ref, mask) + scal + (1, T))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_through_the_view(backend):
    base, y, old, adv, mask, ref = _inputs(2, 6, 10, 5, seed=9)

    def loss(b):
        out = rk.ppo_loss(b[:, :-1], y, old, adv, mask, ref_logp=ref, kl_coef=0.1, backend=backend)
        return out.loss + rk.logprobs(b[:, 1:], y, backend=backend).sum()

    eager_x = base.clone().requires_grad_()
    loss(eager_x).backward()
    compiled_x = base.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, backend="aot_eager")(compiled_x).backward()
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


def test_opt_out_keeps_the_view_in_the_graph(monkeypatch):
    """RLHF_KERNELS_VIEW_GRAD=0: the gradient w.r.t. the view itself can be asked for again."""
    base = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    x = base * 1.0
    y = torch.randint(0, 11, (2, 4))
    view = x[:, :-1]
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(rk.logprobs(view, y).sum(), view)
    monkeypatch.setenv("RLHF_KERNELS_VIEW_GRAD", "0")
    view = x[:, :-1]
    (grad,) = torch.autograd.grad(rk.logprobs(view, y).sum(), view)
    ref = view.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(rk.logprobs(ref, y).sum(), ref)
    torch.testing.assert_close(grad, expected)
