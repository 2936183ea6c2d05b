"""ops/_eager.py: eager calls of the differentiable custom ops run their implementation in a plain
``torch.autograd.Function``; the registered op is still what tracing, fake / meta tensors, subclasses and
dispatch modes see. Both routes must give the same values, gradients and errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import _eager
from rlhf_kernels.ops import kl as kl_ops
from rlhf_kernels.ops import logprobs as lp_ops
from rlhf_kernels.ops import ppo as ppo_ops


class _OpNames(TorchDispatchMode):
    """Records the names of the ops that reach the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _case(seed=0, B=2, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    r = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = -100
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.3
    return x, r, y, old, adv, mask


def _through_the_op(monkeypatch):
    """Every eager call takes the registered op, as before ops/_eager.py."""
    monkeypatch.setattr(_eager, "needs_the_op", lambda args: True)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_eager_route_matches_the_op_route_and_the_oracle(backend, monkeypatch):
    x, r, y, old, adv, mask = _case()

    def run():
        out = {}
        xs = [x.clone().requires_grad_() for _ in range(3)]
        rr = r.clone().requires_grad_()
        logp, ent = rk.logprobs(xs[0][:, :-1], y[:, :-1], return_entropy=True, temperature=0.7, backend=backend)
        (logp.sum() + 0.5 * ent.sum()).backward()
        out["logprobs"], out["d_logprobs"] = (logp, ent), xs[0].grad
        kl = rk.kl_divergence(xs[1], rr, backend=backend)
        kl.sum().backward()
        out["kl"], out["d_kl"], out["d_ref"] = kl, xs[1].grad, rr.grad
        res = rk.ppo_loss(xs[2], y, old, adv, mask, kl_coef=0.1, ref_logp=old * 0.9, entropy_coef=0.01,
                          loss_agg="seq-mean-token-mean", backend=backend)
        res.loss.backward()
        out["ppo"], out["d_ppo"] = (res.loss, res.logp, res.entropy, res.clip_frac), xs[2].grad
        return out

    eager = run()
    _through_the_op(monkeypatch)
    via_op = run()
    for key in eager:
        torch.testing.assert_close(eager[key], via_op[key], rtol=0, atol=0, msg=key)
    # and the float64 oracle (the inputs are float64)
    oracle = reference.logprobs(x[:, :-1], y[:, :-1], temperature=0.7)
    torch.testing.assert_close(eager["logprobs"][0], oracle, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager["kl"], reference.kl_divergence(x, r), rtol=1e-10, atol=1e-12)


def test_eager_calls_skip_the_op_and_dispatch_modes_see_it(monkeypatch):
    x, _, y, *_ = _case(1)
    taken = []
    original = lp_ops.logprobs_fwd_call.op

    def spy(*args):
        taken.append(len(args))
        return original(*args)

    monkeypatch.setattr(lp_ops.logprobs_fwd_call, "op", spy)
    x2 = x.clone().requires_grad_()
    rk.logprobs(x2, y, backend="torch").sum().backward()  # plain eager: the Function, not the op
    assert taken == [] and x2.grad is not None
    with _OpNames() as seen:
        rk.logprobs(x, y, backend="torch")
    assert taken == [9] and "rlhf_kernels.logprobs_fwd.default" in seen.names  # a mode active: the op (9 args)


@pytest.mark.parametrize("name", ["logprobs", "kl_divergence", "ppo_loss"])
def test_eager_backwards_skip_the_backward_op_and_recorded_ones_take_it(name, monkeypatch):
    """An eager backward runs the backward op's implementation directly (``eager_call``), with the op's values; a
    backward recorded into a graph (``create_graph=True``) or run under a dispatch mode takes the registered op.
    (ppo_loss: its two-pass ops run on the Triton backend, here in the interpreter, with RLHF_KERNELS_TRITON_PPO=two-pass.)"""
    if name == "ppo_loss":
        pytest.importorskip("triton")
        monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", "two-pass")  # (the fused form has no backward op)
    x, r, y, old, adv, mask = _case(11)
    module, call_name = {"logprobs": (lp_ops, "logprobs_bwd_call"), "kl_divergence": (kl_ops, "kl_divergence_bwd_call"),
                         "ppo_loss": (ppo_ops, "ppo_term_bwd_call")}[name]
    call = getattr(module, call_name)
    taken = []
    original = call.op

    def spy(*args):
        taken.append(name)
        return original(*args)

    monkeypatch.setattr(call, "op", spy)

    def loss(t):
        if name == "logprobs":
            return rk.logprobs(t, y, backend="torch").sum()
        if name == "kl_divergence":
            return rk.kl_divergence(t, r, backend="torch").sum()
        return rk.ppo_loss(t.float(), y, old, adv, mask, backend="triton").loss

    grads = []
    for how in ("eager", "graph", "mode"):
        t = x.clone().requires_grad_()
        if how == "mode":
            with _OpNames():
                (g,) = torch.autograd.grad(loss(t), t)
        else:
            (g,) = torch.autograd.grad(loss(t), t, create_graph=how == "graph")
        grads.append(g.detach())
        assert len(taken) == (0, 1, 2)[len(grads) - 1], (how, taken)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["meta", "fake", "subclass", "compiling", "functional"])
def test_tensors_the_function_cannot_take_go_to_the_op(kind, monkeypatch):
    t = torch.zeros(2, 3)
    if kind == "meta":
        args = (t.to("meta"), 1.0)
    elif kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fake = mode.from_tensor(t)
        args = (fake, 1.0)
    elif kind == "subclass":

        class Sub(torch.Tensor):
            pass

        args = (t.as_subclass(Sub), 1.0)
    elif kind == "functional":
        args = (torch._to_functional_tensor(t), 1.0)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        args = (t, 1.0)
    assert _eager.needs_the_op(args)
    assert not _eager.needs_the_op((t, 1.0, None, "torch")) or kind == "compiling"
    assert not _eager.needs_the_op((torch.nn.Parameter(t),)) or kind == "compiling"


def test_defaults_are_filled_in_as_the_dispatcher_does():
    """A call that leaves the op's defaulted arguments out gets them, so setup_context sees every input."""
    x, _, y, *_ = _case(2)
    xt = x.clone().requires_grad_()
    logp, _, _ = lp_ops.logprobs_fwd_call(xt, y, 1.0, -100, "torch")  # row_start, row_count, caller left out
    logp.sum().backward()
    xo = x.clone().requires_grad_()
    exp = lp_ops.logprobs_fwd(xo, y, 1.0, -100, "torch")
    exp[0].sum().backward()
    torch.testing.assert_close(logp, exp[0], rtol=0, atol=0)
    torch.testing.assert_close(xt.grad, xo.grad, rtol=0, atol=0)


def test_needs_input_grad_and_no_grad_behave_as_through_the_op(monkeypatch):
    x, r, *_ = _case(3)
    for route in ("eager", "op"):
        if route == "op":
            _through_the_op(monkeypatch)
        xt = x.clone().requires_grad_()
        kl = rk.kl_divergence(xt, r, backend="torch")  # the reference does not train: its gradient is skipped
        kl.sum().backward()
        assert xt.grad is not None and not r.requires_grad
        with torch.no_grad():
            out = rk.kl_divergence(x.clone().requires_grad_(), r, backend="torch")
        assert not out.requires_grad
    # the ppo statistics are marked non-differentiable either way
    x, r, y, old, adv, mask = _case(4)
    res = rk.ppo_loss(x.clone().requires_grad_(), y, old, adv, mask, backend="torch")
    assert res.loss.requires_grad and not res.logp.requires_grad and not res.entropy.requires_grad


def test_bad_targets_raise_the_same_error_on_both_routes(monkeypatch):
    x, _, y, old, adv, mask = _case(5)
    y = y.clone()
    y[1, 2] = 99
    messages = []
    for route in ("eager", "op"):
        if route == "op":
            _through_the_op(monkeypatch)
        for call in (lambda: rk.logprobs(x.clone().requires_grad_(), y, backend="torch"),
                     lambda: rk.ppo_loss(x.clone().requires_grad_(), y, old, adv, mask, backend="torch")):
            with pytest.raises(ValueError) as err:
                call()
            messages.append(str(err.value))
    assert messages[:2] == messages[2:] and "99" in messages[0]


def test_compiled_calls_still_trace_the_op():
    """Under torch.compile the caller takes the registered op (a graph sees one node, as before)."""
    x, _, y, *_ = _case(6, V=7)
    x = x.float()

    def f(x, y):
        return rk.logprobs(x, y, backend="torch")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, y), f(x, y), rtol=1e-6, atol=1e-6)


def test_every_differentiable_logits_op_has_its_eager_caller():
    for module, name in ((lp_ops, "logprobs_fwd"), (kl_ops, "kl_divergence_fwd"), (ppo_ops, "ppo_term_fwd"),
                         (ppo_ops, "ppo_loss_fused")):
        call = getattr(module, name + "_call")
        assert call.op is getattr(module, name)


def test_torch_func_grad_behaves_alike_on_both_routes(monkeypatch):
    """torch.func transforms: the eager Function has the setup_context form they need; whatever the op route does
    (today its backward op has no functorch rule, so both raise), the eager route does the same."""
    x, _, y, *_ = _case(7)

    def f(x):
        return rk.logprobs(x, y, backend="torch").sum()

    outcomes = []
    for route in ("eager", "op"):
        if route == "op":
            _through_the_op(monkeypatch)
        try:
            outcomes.append(("ok", torch.func.grad(f)(x)))
        except RuntimeError as err:
            outcomes.append(("raises", type(err)))
    assert outcomes[0][0] == outcomes[1][0], outcomes
    if outcomes[0][0] == "ok":
        torch.testing.assert_close(outcomes[0][1], outcomes[1][1], rtol=0, atol=0)


def test_inference_mode_and_activation_checkpointing_work_through_the_eager_route():
    """Reference / old-policy passes run under inference_mode; policies under activation checkpointing."""
    from torch.utils.checkpoint import checkpoint

    x, r, y, old, adv, mask = _case(8)
    with torch.no_grad():
        expected = (rk.logprobs(x, y, backend="cpu"), rk.kl_divergence(x, r, backend="cpu"),
                    rk.ppo_loss(x, y, old, adv, mask, backend="cpu").loss)
    with torch.inference_mode():
        got = (rk.logprobs(x, y, backend="cpu"), rk.kl_divergence(x, r, backend="cpu"),
               rk.ppo_loss(x, y, old, adv, mask, backend="cpu").loss)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    rk.logprobs(xa * 2.0, y, backend="cpu").sum().backward()
    checkpoint(lambda z: rk.logprobs(z * 2.0, y, backend="cpu").sum(), xb, use_reentrant=False).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
