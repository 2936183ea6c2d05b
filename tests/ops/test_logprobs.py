"""``rk.logprobs`` on the C++ CPU kernel (and the reference op backend) against the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._checks import as_rows
from tests.bad_targets import OPS_WITH_TARGETS, call_with_bad_target
from tests.poison import poisoned_allocations
from tests.tolerance import assert_matches_oracle, assert_rows_match_oracle

BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check_against_oracle(logits, targets, backend, temperature=1.0, ignore_index=-100):
    """Values and gradients of one call vs the float64 oracle, under DESIGN.md §5's rule."""
    dtype = logits.dtype
    g_logp = torch.randn(targets.shape, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, dtype=torch.float64)

    def run(fn, x):
        x = x.detach().requires_grad_(True)
        lp, ent = fn(x)
        (grad,) = torch.autograd.grad((lp.double() * g_logp + ent.double() * g_ent).sum(), x)
        return lp, ent, grad

    kwargs = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=True)
    with poisoned_allocations():
        fast = run(lambda x: rk.logprobs(x, targets, backend=backend, **kwargs), logits)
    in_dtype = run(lambda x: R.logprobs(x, targets, **kwargs), logits)
    oracle = run(lambda x: R.logprobs(x, targets, **kwargs), logits.double())
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    assert fast[2].dtype == dtype and fast[2].shape == logits.shape
    for name, f, r, o in zip(("logp", "entropy", "grad"), fast, in_dtype, oracle):
        assert_matches_oracle(f, r, o, dtype, what=f"{backend}/{dtype}/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2049), (2, 3, 4097), (1, 50257)])
def test_random_inputs_match_oracle(backend, dtype, shape):
    torch.manual_seed(hash((backend, str(dtype), shape)) % 2**31)
    logits = (torch.randn(shape) * 4).to(dtype)
    targets = torch.randint(0, shape[-1], shape[:-1])
    _check_against_oracle(logits, targets, backend, temperature=0.7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen_vocab_bf16(backend):
    torch.manual_seed(1)
    logits = (torch.randn(3, 151936) * 3).to(torch.bfloat16)
    _check_against_oracle(logits, torch.randint(0, 151936, (3,)), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_are_not_copied_and_match(backend, dtype):
    torch.manual_seed(2)
    base = torch.randn(3, 6, 301).to(dtype)
    logits = base[:, :-1]  # what a causal LM's shift does
    assert not logits.is_contiguous()
    assert as_rows(logits).data_ptr() == base.data_ptr()  # viewed, not copied
    targets = torch.randint(0, 301, (3, 5))
    targets[1, 2] = -100
    _check_against_oracle(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_values(backend, dtype):
    torch.manual_seed(3)
    V = 2500
    logits = torch.randn(8, V)
    logits[0] = 1e4 * torch.sign(torch.randn(V))  # ±1e4
    logits[1, ::3] = -math.inf  # masked vocabulary
    logits[2] = 5.0  # all equal: uniform
    logits[3, :] = -math.inf
    logits[3, 17] = 2.0  # only one finite entry
    logits[4] = torch.randn(V) * 1e3
    if dtype == torch.float16:
        logits[5] = torch.rand(V) * 6e4  # near fp16 overflow
    targets = torch.randint(0, V, (8,))
    targets[1] = 2  # a finite entry of the masked row
    targets[3] = 17
    _check_against_oracle(logits.to(dtype), targets, backend, temperature=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 1.3, 0.7])
def test_huge_float32_logits_keep_their_precision_in_every_row(backend, temperature):
    """Each row judged on its own: log-probs and entropies of rows of size 1e4 hold float32 precision (no
    ``z[y] - lse`` cancellation, no product rounded differently at the maximum), and their gradients the documented
    ``|z|·2^-24`` of the one float32 lse per row (README, "Accuracy")."""
    torch.manual_seed(11)
    V = 37
    logits = 1e4 * torch.sign(torch.randn(6, V))  # ties at +1e4: p = 1/k, the worst case for ulp(lse)
    logits[1] = 1e4  # uniform
    logits[2, :] = -1e4
    logits[2, 5] = 1e4 - 3.0  # one entry near the top, the rest far below
    logits[3] = 1e4 + torch.randn(V)  # noise on top of a large offset
    logits[4] = -1e4 + torch.randn(V)
    targets = torch.tensor([0, 1, 5, 2, 3, 4])
    g_logp, g_ent = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    kw = dict(temperature=temperature, return_entropy=True)

    def run(fn, x):
        x = x.detach().requires_grad_()
        lp, ent = fn(x)
        (grad,) = torch.autograd.grad((lp.double() * g_logp + ent.double() * g_ent).sum(), x)
        return lp, ent, grad

    fast = run(lambda x: rk.logprobs(x, targets, backend=backend, **kw), logits)
    ref = run(lambda x: R.logprobs(x, targets, **kw), logits)
    oracle = run(lambda x: R.logprobs(x, targets, **kw), logits.double())
    for i, name in enumerate(("logp", "entropy")):
        assert_rows_match_oracle(fast[i], ref[i], oracle[i], torch.float32, f"{backend}/{name}")
    z_absmax = logits.abs().amax(-1) / temperature
    assert_rows_match_oracle(fast[2], ref[2], oracle[2], torch.float32, f"{backend}/grad", vocab_last=True,
                             z_absmax=z_absmax)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows_are_zero_with_zero_gradient(backend):
    logits = torch.randn(4, 6, 33, requires_grad=True)
    targets = torch.full((4, 6), -1)
    with poisoned_allocations():
        lp, ent = rk.logprobs(logits, targets, ignore_index=-1, return_entropy=True, backend=backend)
        (lp.sum() + ent.sum()).backward()
    assert torch.equal(lp, torch.zeros(4, 6)) and torch.equal(ent, torch.zeros(4, 6))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_stay_in_their_token(backend):
    logits = torch.randn(4, 100)
    logits[1, 50] = float("nan")
    logits[2, 7] = float("inf")
    targets = torch.randint(0, 100, (4,))
    lp, ent = rk.logprobs(logits, targets, return_entropy=True, backend=backend)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert not torch.isfinite(lp[2])
    oracle_lp, oracle_ent = R.logprobs(logits[[0, 3]].double(), targets[[0, 3]], return_entropy=True)
    assert torch.allclose(lp[[0, 3]].double(), oracle_lp, atol=1e-5)
    assert torch.allclose(ent[[0, 3]].double(), oracle_ent, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    logits = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (2, 3))
    targets[0, 1] = -100

    def fn(x, y):
        return rk.logprobs(x, y, temperature=0.8, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(lambda x: fn(x, targets), (logits,))
    assert torch.autograd.gradcheck(lambda x: fn(x[:, :-1], targets[:, 1:]), (logits,))  # strided rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    from rlhf_kernels.ops.logprobs import logprobs_bwd, logprobs_fwd

    logits = torch.randn(2, 5, 13, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5))
    torch.library.opcheck(logprobs_fwd, (logits, targets, 0.9, -100, backend))
    lp, ent, lse = logprobs_fwd(logits.detach(), targets, 0.9, -100, backend)
    g = torch.randn(2, 5)
    torch.library.opcheck(logprobs_bwd, (g, g.clone(), logits.detach(), targets, lse, ent, 0.9, -100, backend))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    backend = BACKENDS[0]
    logits = torch.randn(2, 6, 40, requires_grad=True)
    targets = torch.randint(0, 40, (2, 5))

    def loss_fn(x):
        lp, ent = rk.logprobs(x[:, :-1], targets, return_entropy=True, backend=backend)
        return -(lp.mean() + 0.01 * ent.mean())

    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    got = compiled(logits)
    (grad,) = torch.autograd.grad(got, logits)
    expected = loss_fn(logits)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_backends_agree_bitwise_shape_and_dtype():
    logits = torch.randn(3, 4, 77).to(torch.bfloat16)
    targets = torch.randint(0, 77, (3, 4))
    outs = [rk.logprobs(logits, targets, return_entropy=True, backend=b) for b in BACKENDS]
    for lp, ent in outs:
        assert lp.shape == (3, 4) and lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[-1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        rk.logprobs(logits.tolist(), targets)
    with pytest.raises(TypeError, match="logits must have dtype"):
        rk.logprobs(logits.long(), targets)
    with pytest.raises(TypeError, match="targets must have dtype"):
        rk.logprobs(logits, targets.float())
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 3\)"):
        rk.logprobs(logits, targets[:, :2])
    with pytest.raises(ValueError, match="logits must have shape"):
        rk.logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be"):
        rk.logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be"):
        rk.logprobs(logits, targets, temperature=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.logprobs(logits, targets, backend="fortran")
    with pytest.raises((RuntimeError, ValueError), match="backend='cuda'"):
        rk.logprobs(logits, targets, backend="cuda")
    with pytest.raises(ValueError, match="targets is on meta"):
        rk.logprobs(logits, targets.to("meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_names_its_position(backend):
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    targets[1, 2] = 10
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = 10 is outside \[0, 10\)"):
        rk.logprobs(logits, targets, backend=backend)
    targets[1, 2] = -5
    with pytest.raises(ValueError, match=r"targets\[1, 2\] = -5"):
        rk.logprobs(logits, targets, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_off_gives_nan_for_that_token_only(backend, monkeypatch):
    """With the check off, the kernels themselves keep a bad target from being read: its log-prob is NaN and its
    gradient row has no one-hot term, ``-g·softmax`` (float64 oracle). Target ``V`` in the last row is the bound's
    edge: ``y > V`` instead of ``y >= V`` in the C++ forward read one element past the logits and passed."""
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "0")
    logits = torch.randn(2, 3, 10, requires_grad=True)
    targets = torch.randint(0, 10, (2, 3))
    targets[0, 1] = 10**9
    targets[1, 0] = -7
    targets[1, 2] = 10  # = V, in the last row: one past the end of the logits
    lp = rk.logprobs(logits, targets, backend=backend)
    good = torch.ones(2, 3, dtype=torch.bool)
    good[0, 1] = good[1, 0] = good[1, 2] = False
    assert torch.isnan(lp[~good]).all() and torch.isfinite(lp[good]).all()
    g = torch.rand(2, 3) + 0.5
    (grad,) = torch.autograd.grad(lp, logits, g)
    probs = torch.softmax(logits.detach().double(), -1)
    onehot = torch.nn.functional.one_hot(targets.clamp(0, 9), 10).double() * good[..., None]
    torch.testing.assert_close(grad.double(), g.double()[..., None] * (onehot - probs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS_WITH_TARGETS)
def test_every_op_with_targets_names_a_bad_one(backend, op):
    """The check runs before the kernels are queued (which never read a bad target either); it raises, naming it."""
    call, where = call_with_bad_target(op, backend)
    with pytest.raises(ValueError, match=where + r" is outside \[0, 10\)"):
        call()


def _record_order(monkeypatch, module, name, order):
    """Patch ``module.name`` to append ``name`` to ``order`` before it runs."""
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: (order.append(name), real(*a, **k))[1])


def _target_op_calls():
    """``(targets, calls)``: each op with targets (``calls[name](targets)``) on [2, 3, 10] CPU inputs, the torch
    backend; the fused-linear ones on the same targets flattened."""
    from rlhf_kernels.ops import ppo as ppo_mod

    B, T, V, H = 2, 3, 10, 4
    logits, ones = torch.randn(B, T, V), torch.ones(B, T)
    targets = torch.randint(0, V, (B, T))
    hidden, weight = torch.randn(B * T, H), torch.randn(V, H)
    calls = {
        "logprobs": lambda y: rk.logprobs(logits, y, backend="torch"),
        "ppo_term_fwd": lambda y: ppo_mod.ppo_term_fwd(logits, y, ones * -2.3, ones, None, 1.0, -100, 0.0, "k3", 0.0,
                                                       0.2, 0.2, None, "torch"),
        "ppo_loss_fused": lambda y: ppo_mod.ppo_loss_fused(logits, y, ones * -2.3, ones, None, ones, 1.0, -100, 0.0,
                                                           "k3", 0.0, 0.2, 0.2, None, "token-mean", 0, "torch"),
        "linear_logprobs": lambda y: rk.linear_logprobs(hidden, weight, y.view(-1), backend="torch"),
        "linear_logprobs frozen head": lambda y: rk.linear_logprobs(hidden.requires_grad_(), weight, y.view(-1),
                                                                    backend="torch"),
        "linear_cross_entropy": lambda y: rk.linear_cross_entropy(hidden.requires_grad_(), weight, y.view(-1),
                                                                  backend="torch"),
    }
    return targets, calls


def test_every_op_checks_targets_before_its_kernels(monkeypatch):
    """On the CPU (off ``OVERLAP_DEVICES``) each op's target check runs before its kernel or first chunk: a bad
    target raises, by name, before any kernel ran. (On a GPU the check is queued first and read after the kernel
    is queued: the next test. Read after a kernel the host waited for, it cost 0.5-0.9 ms per forward + backward
    on an H200.)"""
    from rlhf_kernels.ops import _linear_fused
    from rlhf_kernels.ops import linear as linear_mod
    from rlhf_kernels.ops import logprobs as lp_mod
    from rlhf_kernels.ops import ppo as ppo_mod

    order = []
    _record_order(monkeypatch, lp_mod.deferred_checks, "mode_for", order)  # the check's first step
    for module, kernel in ((lp_mod, "_torch_fwd"), (ppo_mod, "_torch_fwd"), (linear_mod, "_row_forward"),
                           (linear_mod, "_chunk_logits"), (_linear_fused, "_row_chunk_loss")):
        _record_order(monkeypatch, module, kernel, order)
    targets, calls = _target_op_calls()
    for name, call in calls.items():
        order.clear()
        call(targets)
        assert order and order[0] == "mode_for" and len(order) > 1, (name, order)
        bad = targets.clone()
        bad[0, 2] = -4
        order.clear()
        with pytest.raises(ValueError, match=r"\[0, 2\] = -4|\[2\] = -4"):
            call(bad)
        assert order == ["mode_for"], (name, order)  # raised before any kernel ran


def test_the_default_check_is_read_after_the_kernel_is_queued_on_a_gpu(monkeypatch):
    """On ``OVERLAP_DEVICES`` (CUDA; the CPU added here) the default check is queued ahead of the kernel and read
    after it is queued (``TargetCheck``): the host does not wait for the kernel, and the GPU does not idle between
    the check and the kernel's launch. A bad target still raises from the call that got it, naming its position;
    the fused-linear ops read theirs before their first chunk."""
    from rlhf_kernels.ops import _deferred_checks as deferred
    from rlhf_kernels.ops import linear as linear_mod
    from rlhf_kernels.ops import logprobs as lp_mod
    from rlhf_kernels.ops import ppo as ppo_mod

    monkeypatch.setattr(deferred, "OVERLAP_DEVICES", ("cpu", "cuda"))
    order = []
    real_read = deferred.PendingRange.read
    monkeypatch.setattr(deferred.PendingRange, "read", lambda self: (order.append("read"), real_read(self))[1])
    _record_order(monkeypatch, deferred, "PendingRange", order)  # queued
    for module, kernel in ((lp_mod, "_torch_fwd"), (ppo_mod, "_torch_fwd"), (linear_mod, "_chunk_logits")):
        _record_order(monkeypatch, module, kernel, order)
    targets, calls = _target_op_calls()
    targets[1, 1] = -100
    V = 10
    for name in ("logprobs", "ppo_term_fwd", "ppo_loss_fused"):
        call = calls[name]
        for position, bad_value in (None, None), ((0, 2), -4), ((1, 0), V):
            y = targets.clone()
            order.clear()
            if position is None:
                call(y)
            else:
                y[position] = bad_value
                where = rf"\[{position[0]}, {position[1]}\] = {bad_value}"
                with pytest.raises(ValueError, match=where + r" is outside \[0, 10\)"):
                    call(y)
            assert order[0] == "PendingRange" and order[-1] == "read" and "_torch_fwd" in order, (name, order)
    order.clear()
    calls["linear_logprobs"](targets)
    assert order[:3] == ["PendingRange", "read", "_chunk_logits"], order


def test_target_range_counts_ignore_index_as_zero():
    from rlhf_kernels.ops._checks import find_bad_target, target_range

    for dtype in (torch.int64, torch.int32):
        t = torch.tensor([[3, -100, 7], [-100, 2, 5]], dtype=dtype)
        assert target_range(t, -100).tolist() == [0, 7]
        assert target_range(t, 7).tolist() == [-100, 5]
        assert find_bad_target(t, 8, -100) is None
        assert find_bad_target(t, 8, -100, checked=True) is None  # told "bad" wrongly: it still finds none
        assert find_bad_target(t, 7, -100, checked=True) == ((0, 2), 7)


def test_env_backend_preference(monkeypatch):
    logits = torch.randn(2, 10)
    targets = torch.randint(0, 10, (2,))
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
    a = rk.logprobs(logits, targets)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "cuda")  # cannot serve CPU tensors: falls back
    b = rk.logprobs(logits, targets)
    torch.testing.assert_close(a, b)
    monkeypatch.setenv("RLHF_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RLHF_KERNELS_BACKEND"):
        rk.logprobs(logits, targets)


# ------------------------------------------------------------------ overwrite_logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "view"])
def test_overwrite_logits_writes_the_same_gradient_over_them(backend, sliced):
    """``overwrite_logits=True``: the backward writes the gradient over the logits (their base for a ``[:, :-1]``
    view): bit for bit the gradient of a normal call, adopted as ``.grad`` without a copy (it is the logits' own
    storage), the base's other rows zero, the version counter moved."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(3, 6, 37, generator=g)
    targets = torch.randint(0, 37, (3, 5 if sliced else 6), generator=g)
    targets[1, 2] = -100
    weights = torch.randn(targets.shape, generator=g)
    runs = []
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        logits = x[:, :-1] if sliced else x
        version = x._version
        logp, ent = rk.logprobs(logits, targets, return_entropy=True, temperature=0.8, backend=backend,
                                overwrite_logits=overwrite)  # fmt: skip
        ((logp * weights).sum() + 0.3 * ent.sum()).backward()
        runs.append((logp, x.grad, x.grad.data_ptr() == x.data_ptr(), x._version != version, x.detach()))
    (lp0, g0, shared0, moved0, _), (lp1, g1, shared1, moved1, x1) = runs
    assert torch.equal(lp0, lp1) and torch.equal(g0, g1)
    assert not shared0 and not moved0
    assert shared1 and moved1 and torch.equal(x1, g1)
    if sliced:
        assert torch.equal(x1[:, -1], torch.zeros_like(x1[:, -1]))


def test_overwrite_logits_refuses_a_backward_that_needed_them():
    x = torch.randn(2, 4, 9, requires_grad=True)
    h = x * 1.0
    side = h.pow(2).sum()  # saves h; created first, so its backward runs after the logprobs one
    logp = rk.logprobs(h, torch.randint(0, 9, (2, 4)), backend="torch", overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + side).backward()


def test_overwrite_logits_is_ignored_without_a_gradient_or_on_a_copy_and_refuses_non_bools():
    x = torch.randn(2, 4, 9)
    before = x.clone()
    y = torch.randint(0, 9, (2, 4))
    with torch.no_grad():
        rk.logprobs(x, y, backend="torch", overwrite_logits=True)
    xt = torch.randn(4, 2, 9).transpose(0, 1).requires_grad_()  # not contiguous: a separate gradient
    rk.logprobs(xt, y, backend="torch", overwrite_logits=True).sum().backward()
    assert torch.equal(x, before) and xt.grad.data_ptr() != xt.data_ptr()
    with pytest.raises(TypeError, match="overwrite_logits must be True or False"):
        rk.logprobs(x, y, overwrite_logits=1)


@pytest.mark.skipif(not _ext.available(), reason="needs the C++ extension")
def test_the_cpu_backward_refuses_a_gradient_over_other_logits():
    """The C++ backward may write its gradient over the logits themselves, never over a shifted copy of them."""
    big = torch.randn(2, 4, 9)
    x, grad = big[:, :3], big[:, 1:]
    y = torch.zeros(2, 3, dtype=torch.long)
    z = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="grad may overlap logits only by being logits itself"):
        torch.ops.rlhf_kernels_C.logprobs_bwd_out(z, z, x, y, z, z, 1.0, -100, grad)
    torch.ops.rlhf_kernels_C.logprobs_bwd_out(z + 1, z, x, y, z, z, 1.0, -100, x)  # over themselves: allowed


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_loss_overwrite_logits_off_the_fused_path_writes_in_the_backward(backend):
    """``ppo_loss(overwrite_logits=True)`` where the gradient comes from a backward (CPU backends here; Triton and
    CUDA's two-pass path likewise): that backward writes it over the logits' base, bit for bit the normal one."""
    g = torch.Generator().manual_seed(23)
    base = torch.randn(2, 7, 29, generator=g)
    y = torch.randint(0, 29, (2, 6), generator=g)
    old, adv, mask = torch.randn(2, 6, generator=g) - 3, torch.randn(2, 6, generator=g), torch.ones(2, 6)
    runs = []
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        out = rk.ppo_loss(x[:, :-1], y, old, adv, mask, entropy_coef=0.01, backend=backend, overwrite_logits=overwrite)
        out.loss.backward()
        runs.append((out.loss, x.grad, x.grad.data_ptr() == x.data_ptr()))
    (l0, g0, shared0), (l1, g1, shared1) = runs
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and not shared0 and shared1
