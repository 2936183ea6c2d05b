"""Full-size Triton tests on a GPU (``pytest -m gpu``): GPT-2 and Qwen vocabularies.

Same oracle and rule as the interpreter tests (DESIGN.md §5), at the shapes
and block sizes the kernels use in training: V = 50257 / 151936 (several
4096-wide blocks and a ragged tail), bf16 / fp16 / fp32, strided rows,
extreme logits, all-ignored rows, poisoned outputs.
"""


import pytest
import torch
from triton_testutils import INTERPRET, assert_rule, make_logits, make_targets, poisoned_outputs

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import advantages as adv_ops
from rlhf_kernels.ops import logprobs as lp_ops
from rlhf_kernels.ops._dispatch import resolve_backend
from tests.poison import peak_extra_cuda_bytes, poisoned_allocations

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs a CUDA device (compiled Triton)"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

CUDA = torch.device("cuda")
VOCABS = (50257, 151936)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _logprobs_case(x, y, temperature=1.0, *, op_torch=False, seed=0):
    from test_logprobs_triton import _check

    _check(x, y, temperature=temperature, op_torch=op_torch, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_full_vocab(V, dtype):
    full = make_logits((3, 12, V), dtype, seed=V, scale=4.0, device=CUDA)
    x = full[:, :-1]  # strided rows, no copy
    y = make_targets((3, 11), V, seed=V, device=CUDA)
    y[1] = -100  # an all-ignored sequence
    _logprobs_case(x, y, temperature=0.8, seed=V)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_extreme_full_vocab(V, dtype):
    big = 6e4 if dtype == torch.float16 else 1e4
    x = make_logits((5, V), torch.float32, seed=V + 1, scale=big, device=CUDA).clamp(-6e4, 6e4)
    x[1] = 1.5  # all-equal row
    x[2, ::7] = float("-inf")
    x[3, : V - 3] = float("-inf")  # live entries only in the ragged tail
    x[4, V // 2] = x[4].max() + 50  # one dominant logit
    x = x.to(dtype)
    y = torch.tensor([0, V - 1, 1, V - 2, V // 2], device=CUDA)
    _logprobs_case(x, y, op_torch=True, seed=V + 1)


@pytest.mark.parametrize("V", VOCABS)
def test_logprobs_automatic_backend_on_cuda(V):
    """The CUDA C++ kernels when the extension has them (the faster in 71 of 72 H200 cells,
    ``_dispatch.GPU_PREFERENCE``), Triton otherwise; bit-identical to asking for that backend."""
    from rlhf_kernels import _ext

    expected = "cuda" if _ext.has_cuda_kernels() else "triton"
    assert resolve_backend("logprobs", CUDA, None, lp_ops.IMPLEMENTED) == expected
    x = make_logits((4, V), torch.bfloat16, seed=3, device=CUDA)
    y = make_targets((4,), V, seed=3, device=CUDA)
    torch.testing.assert_close(rk.logprobs(x, y), rk.logprobs(x, y, backend=expected), rtol=0, atol=0)
    # float64 on CUDA skips Triton and CUDA (fp32 accumulation) unless asked for
    x64 = x.double()
    torch.testing.assert_close(rk.logprobs(x64, y), reference.logprobs(x64, y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_kl_divergence_full_vocab(V, dtype):
    from test_kl_triton import _check

    x = make_logits((2, 9, V), dtype, seed=V + 2, device=CUDA)[:, 1:]
    r = (x.float() + make_logits((2, 8, V), torch.float32, seed=V + 3, scale=0.3, device=CUDA)).to(dtype)
    _check(x, r, temperature=0.9, seed=V, ref_grad=dtype != torch.float16)


@pytest.mark.parametrize("path", ["fused", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_ppo_loss_full_vocab(V, dtype, path, monkeypatch):
    from test_ppo_triton import _check

    monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", path)
    g = torch.Generator().manual_seed(V)
    x = make_logits((3, 7, V), dtype, seed=V + 4, device=CUDA)[:, :-1]
    y = make_targets((3, 6), V, seed=V + 4, device=CUDA)
    mask = y != -100
    with torch.no_grad():
        logp = reference.logprobs(x.double(), y)
    old = (logp + torch.randn(3, 6, generator=g).to(CUDA) * 0.6).float()
    ref = (logp + torch.randn(3, 6, generator=g).to(CUDA) * 0.2).float()
    adv = torch.randn(3, 6, generator=g).to(CUDA)
    for loss_agg in ("token-mean", "seq-mean-token-mean"):
        _check(x, y, old, adv, mask, dict(ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, clip_high=0.28,
                                          dual_clip=3.0, loss_agg=loss_agg))


def test_ppo_loss_compiled_on_gpu():
    V = 50257
    x = make_logits((2, 5, V), torch.bfloat16, seed=9, device=CUDA)
    y = make_targets((2, 5), V, seed=9, device=CUDA)
    old = torch.randn(2, 5, device=CUDA) - 10
    adv = torch.randn(2, 5, device=CUDA)
    mask = y != -100

    def f(logits):
        return rk.ppo_loss(logits, y, old, adv, mask, entropy_coef=0.01).loss

    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    lc = torch.compile(f, fullgraph=True)(xc)
    lc.backward()
    le = f(xe)
    le.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gae_large(dtype):
    g = torch.Generator().manual_seed(11)
    B, T = 257, 1031
    rewards = torch.randn(B, T, generator=g).to(dtype).to(CUDA)
    values = torch.randn(B, T, generator=g).to(dtype).to(CUDA)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).to(CUDA)
    assert resolve_backend("gae", CUDA, None, adv_ops.IMPLEMENTED) == "triton"
    with poisoned_outputs():
        adv, ret = rk.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    adv64, ret64 = reference.gae(rewards.double(), values.double(), mask, gamma=0.99, lam=0.95)
    advl, retl = reference.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    assert_rule("advantages", adv, advl, adv64, dtype)
    assert_rule("returns", ret, retl, ret64, dtype)


# ------------------------------------------------------------------ slices base[:, a:a+T]: gradient straight to base


def _view_loss(op, x, y, old, adv, ref, mask, r):
    if op == "logprobs":
        lp, ent = rk.logprobs(x, y, return_entropy=True, temperature=0.9, backend="triton")
        return (lp * 1.3).sum() + (ent * 0.7).sum()
    if op == "ppo_loss":
        return rk.ppo_loss(x, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, entropy_coef=0.01, clip_high=0.28,
                           loss_agg="seq-mean-token-mean", backend="triton").loss * 2.5
    return rk.kl_divergence(x, r, mask=mask, backend="triton").sum()


def _view_inputs(B, T, V, seed):
    g = torch.Generator().manual_seed(seed)
    y = make_targets((B, T), V, seed=seed, device=CUDA)
    old = (torch.randn(B, T, generator=g) * 0.5 - 10).to(CUDA)
    adv = torch.randn(B, T, generator=g).to(CUDA)
    ref = old + (torch.randn(B, T, generator=g) * 0.2).to(CUDA)
    return y, old, adv, ref, y != -100


def _base_grads(op, base, ref_base, sl, args, monkeypatch, *, reroute):
    from rlhf_kernels.ops import _checks

    with monkeypatch.context() as m:
        if not reroute:  # today's path: the op sees the view, autograd's SliceBackward builds base.grad
            m.setattr(_checks, "slice_of_base", lambda view: None)
        x = base.detach().clone().requires_grad_()
        r = ref_base.detach().clone().requires_grad_()
        with poisoned_outputs(), poisoned_allocations():
            _view_loss(op, x[:, sl], *args, r[:, sl]).backward()
    return x.grad, r.grad


@pytest.mark.parametrize("op", ("logprobs", "ppo_loss", "kl_divergence"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_view_gradient_goes_to_base(V, dtype, op, monkeypatch):
    B, L = 3, 9
    base = make_logits((B, L, V), dtype, seed=V + 5, device=CUDA)
    ref_base = make_logits((B, L, V), dtype, seed=V + 6, device=CUDA)
    for sl in (slice(None, -1), slice(1, None), slice(2, -1)):
        args = _view_inputs(B, len(range(L)[sl]), V, seed=V + 7)
        got = _base_grads(op, base, ref_base, sl, args, monkeypatch, reroute=True)
        expected = _base_grads(op, base, ref_base, sl, args, monkeypatch, reroute=False)
        assert torch.equal(got[0], expected[0]), f"{op} {sl}: {(got[0] - expected[0]).abs().max()}"
        if op == "kl_divergence":
            assert torch.equal(got[1], expected[1])
        dropped = torch.ones(L, dtype=torch.bool)
        dropped[sl] = False
        assert torch.all(got[0][:, dropped] == 0)


@pytest.mark.parametrize("op", ("logprobs", "ppo_loss"))
def test_view_fwd_bwd_peak_memory_is_one_gradient(op, monkeypatch):
    """bf16 [4, 1025, 151936] logits: fwd + bwd through logits[:, :-1] needs one gradient, not two."""
    from rlhf_kernels.ops import _checks

    B, L, V = 4, 1025, 151936
    base = make_logits((B, L, V), torch.bfloat16, seed=11, device=CUDA).requires_grad_()
    args = _view_inputs(B, L - 1, V, seed=12)

    def step():
        base.grad = None
        _view_loss(op, base[:, :-1], *args, None).backward()

    step()  # warm-up (autotuning)
    grad_bytes = base.numel() * base.element_size()
    base.grad = None
    peak = peak_extra_cuda_bytes(step)
    assert peak <= grad_bytes + 64 * 2**20, f"peak {peak / 2**20:.0f} MiB, one gradient {grad_bytes / 2**20:.0f} MiB"
    with monkeypatch.context() as m:  # the test can fail: today's path holds about two gradients
        m.setattr(_checks, "slice_of_base", lambda view: None)
        base.grad = None
        assert peak_extra_cuda_bytes(step) > 1.8 * grad_bytes


@pytest.mark.parametrize("extension_scale", [True, False])
def test_fused_ppo_step_hands_its_gradient_over(extension_scale, monkeypatch):
    """Triton's forward-with-gradient on a GPU: the backward hands the forward's buffer over as ``.grad`` (no copy;
    a second backward raises), scaled by the upstream gradient, by the extension's kernel or, where the extension's
    CUDA kernels do not run (a Triton-only install), by ``triton.scale.scale_unless_one_``."""
    from rlhf_kernels import _ext
    from rlhf_kernels.triton import scale as triton_scale

    if not extension_scale:
        monkeypatch.setattr(_ext, "cuda_kernels_run_on", lambda device: False)
    calls = []
    original = triton_scale.scale_unless_one_
    monkeypatch.setattr(triton_scale, "scale_unless_one_", lambda x, s: calls.append(1) or original(x, s))
    monkeypatch.setenv("RLHF_KERNELS_TRITON_PPO", "fused")
    V = 50257
    x = make_logits((2, 64, V), torch.bfloat16, seed=12, device=CUDA)
    y = make_targets((2, 64), V, seed=12, device=CUDA)
    old = torch.randn(2, 64, device=CUDA) - 10
    adv = torch.randn(2, 64, device=CUDA)
    mask = y != -100
    grads = []
    for upstream in (1.0, 0.5):
        leaf = x.clone().requires_grad_()
        out = rk.ppo_loss(leaf, y, old, adv, mask, entropy_coef=0.01, backend="triton")
        (out.loss * upstream).backward(retain_graph=True)
        grads.append(leaf.grad)
        with pytest.raises(RuntimeError, match="its backward already ran"):
            out.loss.backward()
    torch.testing.assert_close(grads[1].float(), (grads[0].float() * 0.5).to(torch.bfloat16).float())
    assert len(calls) == (0 if extension_scale else 2)


def test_scale_unless_one_on_the_gpu():
    from rlhf_kernels.triton.scale import scale_unless_one_

    n = (1 << 20) + 3
    x = torch.randn(n, device=CUDA, dtype=torch.bfloat16)
    y = x.clone()
    scale_unless_one_(y, torch.full((), 0.3, device=CUDA))
    assert torch.equal(y, (x.float() * 0.3).to(torch.bfloat16))
    bits = torch.arange(0x7F800001, 0x7F800001 + n, dtype=torch.int32, device=CUDA)  # signalling NaNs
    z = bits.clone().view(torch.float32)
    scale_unless_one_(z, torch.ones((), device=CUDA))
    assert torch.equal(z.view(torch.int32), bits)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("V", VOCABS)
def test_ppo_loss_without_a_gradient_full_vocab(V, dtype):
    """Triton's ``ppo_loss`` under ``no_grad``: the forward kernel between ``triton/aggregate.py``'s kernels, against
    the oracle at the full vocabularies, every ``loss_agg``, 0 / 1 and fractional masks."""
    from test_ppo_triton import _inputs

    for loss_agg in reference.LOSS_AGG_MODES:
        x, y, old, adv, mask, ref = _inputs(4, 33, V, dtype, seed=V % 97, strided=True)
        x, y, old, adv, ref = (t.to(CUDA) for t in (x, y, old, adv, ref))
        for m in (mask.to(CUDA), torch.rand(mask.shape, device=CUDA) * mask.to(CUDA)):
            kwargs = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, clip_high=0.28, loss_agg=loss_agg)
            with torch.no_grad(), poisoned_outputs():
                out = rk.ppo_loss(x, y, old, adv, m, backend="triton", **kwargs)
            out64 = reference.ppo_loss(x.double(), y, old, adv, m, **kwargs)
            outl = reference.ppo_loss(x, y, old, adv, m, **kwargs)
            for name in ("loss", "logp", "entropy", "kl", "approx_kl"):
                assert_rule(f"{loss_agg}/{name}", getattr(out, name), getattr(outl, name), getattr(out64, name),
                            dtype)
