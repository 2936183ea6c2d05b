"""Fused-linear ops (issue 6): ``linear_logprobs`` and the losses built on it, against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops import linear as L
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.tolerance import assert_matches_oracle

BACKENDS = ["cpu", "torch"] if _ext.available() else ["torch"]


def _inputs(lead, H, V, dtype, seed=0, bias=True, ignore=()):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * H**-0.5 * 3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    flat = targets.view(-1)
    for i in ignore:
        flat[i] = -100
    return hidden, weight, targets, b


def _run(fn, hidden, weight, bias, g_logp, g_ent):
    """Values and gradients (hidden, weight[, bias]) of ``Σ g_logp·logp + g_ent·entropy``."""
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    lp, ent = fn(*leaves) if bias is not None else fn(*leaves, None)
    grads = torch.autograd.grad((lp.double() * g_logp + ent.double() * g_ent).sum(), leaves)
    return (lp, ent) + tuple(grads)


def _materialised_in_dtype(targets, slicer=lambda h: h, **kw):
    """The reference run in the input dtype: logits (and their gradient) in that dtype, the log-softmax by the oracle.

    ``reference.linear_logprobs`` upcasts bf16 / fp16 to float32 before the
    matmul, so it is not an in-dtype run; a user's materialised bf16 path is
    ``F.linear`` in bf16 then the log-softmax, whose error this rule scales by.
    """

    def fn(h, w, b):
        return R.logprobs(F.linear(slicer(h), w, b), targets, **kw)

    return fn


def _check(hidden, weight, targets, bias, *, backend, temperature=1.0, chunk_size=None, slicer=None):
    """One call vs the float64 oracle (values and all gradients) under DESIGN.md §5's rule."""
    dtype = hidden.dtype
    slicer = slicer or (lambda h: h)
    shape = slicer(hidden).shape[:-1]
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(shape, generator=g, dtype=torch.float64)
    kw = dict(temperature=temperature, return_entropy=True)

    def fast(h, w, b):
        return rk.linear_logprobs(slicer(h), w, targets, b, chunk_size=chunk_size, backend=backend, **kw)

    def ref(h, w, b):
        return R.linear_logprobs(slicer(h), w, targets, b, **kw)

    got = _run(fast, hidden, weight, bias, g_logp, g_ent)
    in_dtype = _run(_materialised_in_dtype(targets, slicer, **kw), hidden, weight, bias, g_logp, g_ent)
    to64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    oracle = _run(ref, *to64, g_logp, g_ent)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    names = ("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, f, r, o in zip(names, got, in_dtype, oracle):
        if name.startswith("grad"):
            assert f.dtype == dtype, f"{name} dtype {f.dtype}"
        assert_matches_oracle(f, r, o, dtype, what=f"{backend}/{dtype}/{name}")
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, H, V, chunk_size",
    [
        ((1,), 16, 7, None),  # N = 1
        ((13,), 37, 7, 4),  # V = 7, H not a multiple of 8, chunk not dividing N
        ((2, 9), 37, 301, 5),  # [B, T, H] leading dims
        ((3,), 24, 50257, 2),  # GPT-2 vocab, small N
        ((40,), 64, 1000, None),  # automatic chunk (one chunk here)
    ],
)
def test_matches_oracle(backend, dtype, lead, H, V, chunk_size):
    n = 1
    for s in lead:
        n *= s
    ignore = (0, n - 2) if n > 3 else ()
    hidden, weight, targets, bias = _inputs(lead, H, V, dtype, ignore=ignore)
    _check(hidden, weight, targets, bias, backend=backend, temperature=0.7, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_strided_hidden_and_all_ignored(backend):
    hidden, weight, _, _ = _inputs((3, 8), 37, 53, torch.float32, bias=False)
    targets = torch.randint(0, 53, (3, 7))
    targets[1] = -100  # an all-ignored sequence
    targets[2, 3] = -100
    got = _check(hidden, weight, targets, None, backend=backend, temperature=1.3, chunk_size=5,
                 slicer=lambda h: h[:, :-1])
    assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == 0)
    assert torch.all(got[2][1, :-1] == 0)  # no gradient reaches ignored positions


def test_chunking_does_not_change_the_result():
    hidden, weight, targets, bias = _inputs((37,), 20, 90, torch.float64, ignore=(5,))
    outs = [rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=c, return_entropy=True) for c in (1, 6, 37, 100)]
    for lp, ent in outs[1:]:
        torch.testing.assert_close(lp, outs[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ent, outs[0][1], rtol=0, atol=1e-12)


def test_matches_logprobs_of_materialised_logits():
    hidden, weight, targets, bias = _inputs((2, 5), 12, 33, torch.float32, ignore=(3,))
    lp, ent = rk.linear_logprobs(hidden, weight, targets, bias, return_entropy=True, temperature=0.9, chunk_size=3)
    lp2, ent2 = rk.logprobs(F.linear(hidden, weight, bias), targets, return_entropy=True, temperature=0.9)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    hidden, weight, targets, bias = _inputs((2, 4), 5, 7, torch.float64, ignore=(2,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return rk.linear_logprobs(h, w, targets, b, temperature=0.8, return_entropy=True, chunk_size=3, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves)
    strided_targets = targets[:, 1:]

    def fn_strided(h, w):
        return rk.linear_logprobs(h[:, :-1], w, strided_targets, chunk_size=2, backend=backend, return_entropy=True)

    assert torch.autograd.gradcheck(fn_strided, leaves[:2])


def test_only_requested_gradients_are_computed():
    hidden, weight, targets, bias = _inputs((6,), 8, 11, torch.float64)
    hidden.requires_grad_(True)  # frozen head: weight and bias need no gradient
    lp = rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=4)
    (gh,) = torch.autograd.grad(lp.sum(), hidden)
    (expected,) = torch.autograd.grad(R.linear_logprobs(hidden, weight, targets, bias).sum(), hidden)
    torch.testing.assert_close(gh, expected)
    w = weight.clone().requires_grad_(True)  # only the head trains
    lp = rk.linear_logprobs(hidden.detach(), w, targets, chunk_size=4, return_entropy=True)[1]
    (gw,) = torch.autograd.grad(lp.sum(), w)
    (expected,) = torch.autograd.grad(R.linear_logprobs(hidden.detach(), w, targets, return_entropy=True)[1].sum(), w)
    torch.testing.assert_close(gw, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    hidden, weight, targets, bias = _inputs((9,), 6, 13, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    torch.library.opcheck(L.linear_logprobs_fwd, (*leaves[:2], targets, leaves[2], 0.9, -100, 4, backend))
    torch.library.opcheck(L.linear_logprobs_fwd, (leaves[0], leaves[1], targets, None, 1.0, -100, 0, backend))
    with torch.no_grad():
        _, ent, lse = L.linear_logprobs_fwd(hidden, weight, targets, bias, 0.9, -100, 4, backend)
    g = torch.randn(9)
    args = (g, g.clone(), hidden.detach(), weight.detach(), targets, bias.detach(), lse, ent, 0.9, -100, 4, backend)
    torch.library.opcheck(L.linear_logprobs_bwd, args + (True, True, True))
    torch.library.opcheck(L.linear_logprobs_bwd, args + (True, False, False))


def test_torch_compile_fullgraph():
    backend = BACKENDS[0]
    hidden, weight, targets, bias = _inputs((2, 7), 10, 29, torch.float32, ignore=(4,))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def loss_fn(h, w, b):
        lp, ent = rk.linear_logprobs(h[:, :-1], w, targets[:, 1:], b, return_entropy=True, chunk_size=4, backend=backend)
        return -(lp.mean() + 0.01 * ent.mean())

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    expected = loss_fn(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves)
    torch.testing.assert_close(got, expected)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces, tracing into the fused-linear custom ops' bodies."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()
        self._impls = {
            "linear_logprobs_fwd": L.linear_logprobs_fwd._init_fn,
            "linear_logprobs_bwd": L.linear_logprobs_bwd._init_fn,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "_opname", "")
        if func.namespace == "rlhf_kernels" and name in self._impls:
            self.ops.add(name)
            with self:  # the mode is off inside __torch_dispatch__; switch it back on for the op's body
                out = self._impls[name](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_are_never_materialised(backend):
    N, H, V = 24, 8, 301
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.float32)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def step(chunk):
        mode = _LargestTensor()
        with mode:
            lp, ent = rk.linear_logprobs(*leaves[:2], targets, leaves[2], return_entropy=True, chunk_size=chunk,
                                         backend=backend)
            (lp.sum() + ent.sum()).backward()
        assert mode.ops == {"linear_logprobs_fwd", "linear_logprobs_bwd"}, mode.ops
        return mode.largest

    assert step(N) >= N * V  # the probe sees the logits when they do exist (one chunk)
    largest = step(7)
    assert largest < N * V and largest <= max(7 * V, V * H), largest

    mode = _LargestTensor()  # no-grad scoring (old-policy / reference log-probs): one chunk
    with torch.no_grad(), mode:
        rk.linear_logprobs(hidden, weight, targets, bias, chunk_size=5, backend=backend)
    assert mode.largest <= max(5 * V, V * H), mode.largest


def test_auto_chunk_size():
    cpu = torch.device("cpu")
    rows = L.auto_chunk_size(2048, 512, 50257, torch.float32, cpu)
    assert 32 <= rows < 2048 and rows * 50257 * 4 <= 32 * 2**20
    assert L.auto_chunk_size(5, 512, 50257, torch.float32, cpu) == 5
    assert L.auto_chunk_size(100000, 64, 7, torch.float32, cpu) <= 100000
    assert L.auto_chunk_size(4096, 64, 10**6, torch.float32, cpu) == 32  # min rows keep the dW GEMM efficient


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_triton_backend_small():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = _inputs((2, 5), 12, 37, torch.float32, ignore=(3,))
    hidden, weight, targets, bias = (t.to(device) for t in (hidden, weight, targets, bias))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    lp, ent = rk.linear_logprobs(*leaves[:2], targets, leaves[2], return_entropy=True, temperature=0.8,
                                 chunk_size=3, backend="triton")
    (lp.sum() + 0.5 * ent.sum()).backward()
    got = [lp.detach(), ent.detach()] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    lp_r, ent_r = R.linear_logprobs(*ref_leaves[:2], targets, ref_leaves[2], return_entropy=True, temperature=0.8)
    (lp_r.sum() + 0.5 * ent_r.sum()).backward()
    expected = [lp_r.detach(), ent_r.detach()] + [t.grad for t in ref_leaves]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_linear_ppo_loss_matches_ppo_loss(backend, loss_agg):
    hidden, weight, targets, bias = _inputs((3, 6), 10, 41, torch.float64, ignore=(4,))
    g = torch.Generator().manual_seed(2)
    old_logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    ref_logp = -torch.rand(3, 6, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, generator=g) > 0.2
    kw = dict(ref_logp=ref_logp, kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, temperature=0.9, loss_agg=loss_agg,
              backend=backend)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    out = rk.linear_ppo_loss(*leaves[:2], targets, old_logp, adv, mask, bias=leaves[2], chunk_size=4, **kw)
    grads = torch.autograd.grad(out.loss, leaves)
    logits = F.linear(*leaves)
    expected = rk.ppo_loss(logits, targets, old_logp, adv, mask, **kw)
    expected_grads = torch.autograd.grad(expected.loss, leaves)
    assert isinstance(out, rk.PPOLossOutput)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_torch(reduction):
    hidden, weight, targets, bias = _inputs((4, 5), 9, 23, torch.float64, ignore=(2, 7))
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    got = rk.linear_cross_entropy(*leaves[:2], targets, leaves[2], reduction=reduction, chunk_size=3)
    expected = F.cross_entropy(F.linear(*leaves).reshape(-1, 23), targets.reshape(-1), reduction=reduction)
    if reduction == "none":
        expected = expected.reshape(4, 5)
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.sum(), leaves)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)
    empty = rk.linear_cross_entropy(hidden, weight, torch.full_like(targets, -100))
    assert empty.item() == 0.0  # all ignored: 0, not NaN


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, bias = _inputs((4,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="same H"):
        rk.linear_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="targets"):
        rk.linear_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="bias"):
        rk.linear_logprobs(hidden, weight, targets, bias[:4])
    with pytest.raises(ValueError, match="chunk_size"):
        rk.linear_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(TypeError, match="targets"):
        rk.linear_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="temperature"):
        rk.linear_logprobs(hidden, weight, targets, temperature=0.0)
    bad = targets.clone()
    bad[2] = 11
    with pytest.raises(ValueError, match=r"targets\[2\] = 11"):
        rk.linear_logprobs(hidden, weight, bad, chunk_size=2)
    with pytest.raises(ValueError, match="reduction"):
        rk.linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="mask"):
        rk.linear_ppo_loss(hidden, weight, targets, torch.zeros(4), torch.zeros(4), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_gpt2_shape():
    N, H, V = 4096, 1024, 50257
    hidden, weight, targets, bias = _inputs((N,), H, V, torch.bfloat16, ignore=(0, 17))
    hidden, weight, targets, bias = (t.cuda() for t in (hidden, weight, targets, bias))
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(N, generator=g, dtype=torch.float64).cuda()
    g_ent = torch.randn(N, generator=g, dtype=torch.float64).cuda()
    kw = dict(temperature=0.9, return_entropy=True)
    got = _run(lambda h, w, b: rk.linear_logprobs(h, w, targets, b, **kw), hidden, weight, bias, g_logp, g_ent)
    in_dtype = _run(_materialised_in_dtype(targets, **kw), hidden, weight, bias, g_logp, g_ent)
    f32 = [t.float() for t in (hidden, weight, bias)]
    oracle = _run(lambda h, w, b: R.linear_logprobs(h, w, targets, b, **kw), *f32, g_logp, g_ent)
    for name, f, r, o in zip(("logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"), got, in_dtype, oracle):
        assert_matches_oracle(f, r, o, torch.bfloat16, what=f"gpu/bf16/{name}")
