"""``linear_logprobs`` with a head that needs no gradient (LoRA, a frozen LM head): the hidden states' gradient
direction computed in the forward (``rlhf_kernels::linear_logprobs_frozen_head``), 2 matmuls instead of 3.

Against the float64 oracle (log-probs and the hidden states' gradient, DESIGN.md §5's rule) on odd shapes
(N = 1, V = 7, 301, 50257, H not a multiple of 8, strided hidden states), ignored and all-ignored targets,
temperature and poisoned allocations; plus which path runs (the matmul count), gradcheck, opcheck,
torch.compile, a second backward, bad targets and the Triton backend under the interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlhf_kernels as rk
from rlhf_kernels import reference as R
from rlhf_kernels.ops import linear as L
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.ops.test_linear import BACKENDS, _inputs, _MatmulCounter
from tests.ops.test_random_configurations import _z_absmax
from tests.poison import poisoned_allocations
from tests.tolerance import assert_matches_oracle, float32_lse_error


def _logp_and_grad(fn, hidden, g):
    """``(logp, ∂(Σ g·logp)/∂hidden)`` of ``fn(hidden)``; the head is a constant."""
    h = hidden.detach().requires_grad_(True)
    lp = fn(h)
    (grad,) = torch.autograd.grad((lp.double() * g).sum(), h)
    return lp, grad


def _grad_hidden_allowance(hidden, weight, targets, bias, g, dtype, temperature):
    """What the hidden states' gradient may carry beyond DESIGN §5's bound from its logits' gradient, rounded to
    ``dtype`` (2 ulps per element) and, in float32, off by what the row's one float32 lse allows, before the GEMM
    with the head sums V such terms (``assert_matches_oracle``'s ``allowance``, as the random fused-linear cases'):
    ``|∂/∂logits| · (2·eps + lse error) @ |W|``. Without it the float32 GPT-2 case sat at its bound and failed on
    an AVX2 machine (error 1.49e-5 against 1.48e-5, the materialised float32 path itself 7.3e-6)."""
    logits = F.linear(hidden.double(), weight.double(), bias.double()).requires_grad_(True)
    (dlogits,) = torch.autograd.grad((R.logprobs(logits, targets, temperature=temperature) * g).sum(), logits)
    z_absmax = _z_absmax(logits, temperature=temperature).unsqueeze(-1)
    lse_error = float32_lse_error(z_absmax) if dtype == torch.float32 else torch.zeros_like(z_absmax)
    return (dlogits.abs() * (2.0 * torch.finfo(dtype).eps + lse_error)) @ weight.double().abs()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lead, H, V, chunk_size, ignore",
    [
        ((1,), 16, 7, None, ()),  # N = 1
        ((13,), 37, 7, 4, (0, 11)),  # V = 7, H not a multiple of 8, chunk not dividing N
        ((2, 9), 37, 301, 5, (3,)),  # [B, T, H] leading dims
        ((3,), 24, 50257, 2, ()),  # GPT-2 vocab, small N
        ((2, 3), 13, 301, None, (0, 1, 2, 3, 4, 5)),  # every target ignored
    ],
)
def test_frozen_head_matches_oracle(backend, dtype, lead, H, V, chunk_size, ignore):
    hidden, weight, targets, bias = _inputs(lead, H, V, dtype, seed=V + H, ignore=ignore)
    g = torch.randn(lead, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kw = dict(temperature=0.7)
    with poisoned_allocations():
        got = _logp_and_grad(
            lambda h: rk.linear_logprobs(h, weight, targets, bias, chunk_size=chunk_size, backend=backend, **kw),
            hidden, g)  # fmt: skip
    in_dtype = _logp_and_grad(lambda h: R.logprobs(F.linear(h, weight, bias), targets, **kw), hidden, g)
    oracle = _logp_and_grad(
        lambda h: R.linear_logprobs(h, weight.double(), targets, bias.double(), **kw), hidden.double(), g)  # fmt: skip
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    allowances = (None, _grad_hidden_allowance(hidden, weight, targets, bias, g, dtype, kw["temperature"]))
    for name, f, r, o, allowance in zip(("logp", "grad_hidden"), got, in_dtype, oracle, allowances):
        assert_matches_oracle(f, r, o, dtype, what=f"{backend}/{dtype}/{lead}x{H}x{V}/{name}", allowance=allowance)
    flat = targets.reshape(-1) == -100
    assert torch.all(got[1].reshape(-1, H)[flat] == 0)  # ignored rows get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_strided_hidden_without_bias(backend):
    hidden, weight, _, _ = _inputs((3, 8), 37, 53, torch.float32, bias=False)
    targets = torch.randint(0, 53, (3, 7), generator=torch.Generator().manual_seed(2))
    targets[1, 2] = -100
    g = torch.randn(3, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _logp_and_grad(lambda h: rk.linear_logprobs(h[:, :-1], weight, targets, chunk_size=4, backend=backend,
                                                      temperature=1.3), hidden, g)  # fmt: skip
    oracle = _logp_and_grad(lambda h: R.linear_logprobs(h[:, :-1], weight.double(), targets, temperature=1.3),
                            hidden.double(), g)  # fmt: skip
    for f, o in zip(got, oracle):
        torch.testing.assert_close(f.double(), o, rtol=1e-5, atol=1e-5)
    assert torch.all(got[1][:, -1] == 0)  # the sliced-off position gets no gradient


def test_frozen_head_path_runs_two_matmuls_per_chunk():
    """Only ``hidden`` trains and the entropy is not returned: 2 matmuls per chunk, all in the forward. The
    entropy, a head that trains, or the vocabulary slabs take the recompute path (3 or 4 per chunk)."""
    hidden, weight, targets, bias = _inputs((12,), 8, 301, torch.float32)
    chunks = 3  # chunk_size 5 over 12 rows

    def count(train_head=False, grad=True, **kw):
        h = hidden.clone().requires_grad_(grad)
        w, b = weight.clone().requires_grad_(train_head), bias.clone().requires_grad_(train_head)
        mode = _MatmulCounter()
        with mode:
            out = rk.linear_logprobs(h, w, targets, b, chunk_size=5, backend=BACKENDS[0], **kw)
            forward = mode.matmuls
            if grad and torch.is_grad_enabled():
                lp = out[0] if isinstance(out, tuple) else out
                lp.sum().backward()
        return forward, mode.matmuls

    assert count() == (2 * chunks, 2 * chunks)  # the backward runs no matmul
    assert count(return_entropy=True) == (chunks, 3 * chunks)  # logits again, then dX
    assert count(train_head=True) == (chunks, 4 * chunks)
    assert count(grad=False) == (chunks, chunks)
    with torch.no_grad():
        assert count() == (chunks, chunks)


def test_frozen_head_backward_materialises_no_zero_gradient():
    """The saved direction is an output that takes no upstream gradient: the backward must not be handed a
    zero-filled float32 [N, H] for it (autograd's default for unused outputs), a second [N, H] buffer per step."""
    from tests.poison import zero_fills_during

    hidden, weight, targets, bias = _inputs((12,), 8, 301, torch.float32)
    h = hidden.clone().requires_grad_()
    logp = rk.linear_logprobs(h, weight, targets, bias, chunk_size=5, backend=BACKENDS[0])
    assert zero_fills_during(logp.sum().backward, h.numel()) == []
    assert h.grad is not None


def test_frozen_head_gradcheck_float64_and_second_backward():
    hidden, weight, targets, bias = _inputs((2, 4), 5, 7, torch.float64, ignore=(2,))
    h = hidden.requires_grad_(True)

    def fn(x):
        return rk.linear_logprobs(x, weight, targets, bias, temperature=0.8, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (h,))
    lp = fn(h)
    (first,) = torch.autograd.grad(lp.sum(), h, retain_graph=True)
    (second,) = torch.autograd.grad((2 * lp).sum(), h)  # the saved direction is not consumed by the first
    torch.testing.assert_close(second, 2 * first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_opcheck(backend):
    hidden, weight, targets, bias = _inputs((9,), 6, 13, torch.float32, ignore=(4,))
    h = hidden.requires_grad_(True)
    torch.library.opcheck(L.linear_logprobs_frozen_head, (h, weight, targets, bias, 0.9, -100, 4, backend))
    torch.library.opcheck(L.linear_logprobs_frozen_head, (h, weight, targets, None, 1.0, -100, 0, backend))
    direction = torch.randn(9, 6)
    torch.library.opcheck(L.linear_logprobs_frozen_head_bwd, (direction, torch.randn(9), torch.bfloat16))


def test_frozen_head_double_backward_raises():
    """The backward is not differentiable (``∂direction/∂hidden`` is not formed): a second derivative raises, as
    through ``linear_logprobs_bwd``, rather than coming out silently short."""
    hidden, weight, targets, _ = _inputs((5,), 8, 11, torch.float32)
    h = hidden.requires_grad_(True)
    lp = rk.linear_logprobs(h, weight, targets)
    (g,) = torch.autograd.grad((lp**2).sum(), h, create_graph=True)  # the upstream gradient depends on h
    with pytest.raises(RuntimeError, match="autograd"):
        torch.autograd.grad(g.sum(), h)


def test_frozen_head_torch_compile_fullgraph():
    hidden, weight, targets, bias = _inputs((2, 7), 10, 29, torch.float32, ignore=(4,))
    h = hidden.requires_grad_(True)

    def loss_fn(x):
        return -rk.linear_logprobs(x[:, :-1], weight, targets[:, 1:], bias, chunk_size=4, backend=BACKENDS[0]).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(h)
    expected = loss_fn(h)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(torch.autograd.grad(got, h)[0], torch.autograd.grad(expected, h)[0])


def test_frozen_head_bad_targets_raise():
    hidden, weight, targets, _ = _inputs((6,), 4, 9, torch.float32)
    targets[2] = 9
    with pytest.raises(ValueError, match="targets"):
        rk.linear_logprobs(hidden.requires_grad_(True), weight, targets)


@pytest.mark.skipif(not (triton_importable() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton (GPU, or TRITON_INTERPRET=1 on the CPU)")
def test_frozen_head_triton_backend_small():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, bias = (t.to(device) for t in _inputs((2, 5), 12, 37, torch.float32, ignore=(3,)))
    g = torch.randn(2, 5, dtype=torch.float64, device=device)
    got = _logp_and_grad(lambda h: rk.linear_logprobs(h, weight, targets, bias, chunk_size=4, backend="triton"),
                         hidden, g)  # fmt: skip
    oracle = _logp_and_grad(lambda h: R.linear_logprobs(h, weight.double(), targets, bias.double()),
                            hidden.double(), g)  # fmt: skip
    for f, o in zip(got, oracle):
        torch.testing.assert_close(f.double().cpu(), o.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_bf16_frozen_head_gpt2_shape(backend):
    from rlhf_kernels import _ext

    if backend == "cuda" and not _ext.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    N, H, V = 4096, 1024, 50257
    hidden, weight, targets, bias = (t.cuda() for t in _inputs((N,), H, V, torch.bfloat16, ignore=(0, 17)))
    g = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).cuda()
    kw = dict(temperature=0.9)
    got = _logp_and_grad(lambda h: rk.linear_logprobs(h, weight, targets, bias, backend=backend, **kw), hidden, g)
    in_dtype = _logp_and_grad(lambda h: R.logprobs(F.linear(h, weight, bias), targets, **kw), hidden, g)
    oracle = _logp_and_grad(lambda h: R.linear_logprobs(h, weight.float(), targets, bias.float(), **kw),
                            hidden.float(), g)  # fmt: skip
    for name, f, r, o in zip(("logp", "grad_hidden"), got, in_dtype, oracle):
        assert_matches_oracle(f, r, o, torch.bfloat16, what=f"gpu/{backend}/frozen/{name}")
