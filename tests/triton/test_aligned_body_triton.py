"""The Triton kernels' ``ALIGNED_BODY`` walk (``triton/_common.py``): rows of an odd length or stride
split into their head, whole 16-byte aligned blocks and the rest, the same values as the plain walk.

Elementwise kernels, so the two walks must agree bit for bit, at every row misalignment (odd V: rows of one
tensor start at every offset modulo a 16-byte vector), contiguous and strided (``[:, :-1]`` views), with a masked
head block, whole blocks and a masked tail (V = 198, 301 in the interpreter's 64-column blocks; V = 7 in one
block), for logprobs, the exact KL (with and without the reference's gradient) and the PPO term;
the forwards to float32 rounding (their sums in another order). ``aot_compile_kernels.py`` checks that the walk
compiles to 16-byte accesses on sm_90 (and that the plain walk cannot).
"""

import pytest
import torch
import triton
import triton.language as tl

from rlhf_kernels.triton import _common, kl, logprobs, ppo
from triton_testutils import DEVICE, DTYPES, make_logits, make_targets

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.slow]


def _cases(V, dtype, seed):
    """``(rows, out)`` pairs on 16-byte aligned bases whose rows start at every misalignment (odd V, 8+ rows): a
    contiguous ``[2, 8, V]``, and ``[:, :-1]`` of a ``[2, 9, V]`` buffer written into the same slice of another
    (equal strides, as the ops' ``out=``; a fresh contiguous gradient would not share them)."""
    whole = make_logits((2, 8, V), dtype, seed=seed)
    big = make_logits((2, 9, V), dtype, seed=seed + 1)
    return [(whole, None), (big[:, :-1], torch.empty_like(big)[:, :-1])]


_BODY_ALIGNED = _common.body_aligned


def _both_walks(monkeypatch, call):
    """``call()`` with ``body_aligned`` as is (asserted to choose ALIGNED_BODY), then forced off (the launchers
    reach it through ``_common.body_walk``)."""
    chosen = []
    real = _BODY_ALIGNED  # (not _common's attribute: a previous call's patch may still be on it)

    def spy(*tensors):
        chosen.append(real(*tensors))
        return chosen[-1]

    monkeypatch.setattr(_common, "body_aligned", spy)
    aligned = call()
    assert chosen and all(chosen), chosen
    monkeypatch.setattr(_common, "body_aligned", lambda *tensors: False)
    plain = call()
    return aligned, plain


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [198, 301, 7])
def test_logprobs_and_ppo_backward_walks_agree(monkeypatch, dtype, V):
    for case, (x, out) in enumerate(_cases(V, dtype, seed=V)):
        n = tuple(x.shape[:2])
        y = make_targets(n, V, seed=case)
        g = torch.Generator().manual_seed(case)
        g_logp, g_ent, g_term, g_kl = (torch.randn(n, generator=g).to(DEVICE) for _ in range(4))
        logp, ent, lse = logprobs.logprobs_fwd(x, y, 0.8, -100)
        a, p = _both_walks(monkeypatch,
                           lambda: logprobs.logprobs_bwd(g_logp, g_ent, x, y, lse, ent, 0.8, -100, out=out).clone())
        assert torch.equal(_bits(a), _bits(p)), f"logprobs case {case}"
        old, adv, ref = logp + 0.1, torch.randn(n, generator=g).to(DEVICE), logp - 0.2
        kw = dict(temperature=0.8, ignore_index=-100, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                  clip_low=0.2, clip_high=0.28, dual_clip=3.0)
        a, p = _both_walks(monkeypatch, lambda: ppo.ppo_term_bwd(
            g_term, g_logp, g_ent, g_kl, x, y, logp, ent, lse, old, adv, ref, **kw, out=out).clone())
        assert torch.equal(_bits(a), _bits(p)), f"ppo case {case}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_ref_grad", [False, True])
def test_kl_backward_walks_agree(monkeypatch, dtype, need_ref_grad):
    V = 198
    for case, (x, out) in enumerate(_cases(V, dtype, seed=3)):
        # the reference rows (and their gradient) laid out as the logits, as body_aligned requires
        r = make_logits((2, 9, V), dtype, seed=50 + case)[:, :-1] if out is not None else make_logits(
            tuple(x.shape), dtype, seed=50 + case)
        ref_out = None
        if out is not None and need_ref_grad:
            ref_out = torch.empty(2, 9, V, dtype=dtype, device=DEVICE)[:, :-1]
        g = torch.randn(tuple(x.shape[:2]), generator=torch.Generator().manual_seed(case)).to(DEVICE)
        klv, lz, lr = kl.kl_divergence_fwd(x, r, 0.9)

        def call():
            dx, dr = kl.kl_divergence_bwd(g, x, r, klv, lz, lr, 0.9, need_ref_grad, out=out, ref_out=ref_out)
            return dx.clone(), None if dr is None else dr.clone()

        a, p = _both_walks(monkeypatch, call)
        assert torch.equal(_bits(a[0]), _bits(p[0])), f"dlogits case {case}"
        if need_ref_grad:
            assert torch.equal(_bits(a[1]), _bits(p[1])), f"dref case {case}"


def test_body_aligned_takes_the_walk_only_where_it_is_sound_and_needed():
    bf = torch.empty(4 * 50304, dtype=torch.bfloat16, device=DEVICE)
    odd = bf[: 2 * 2 * 50257].view(2, 2, 50257)
    assert _common.body_aligned(odd, torch.empty_like(odd))  # odd V and strides: the walk
    assert not _common.body_aligned(bf[1:1 + 4 * 50257].view(2, 2, 50257))  # base not 16-byte aligned
    padded = bf.view(2, 2, 50304)[..., :50257]  # the fused-linear ops' padded rows: aligned strides, odd V
    assert _common.body_aligned(padded, torch.empty(2, 2, 50304, dtype=torch.bfloat16, device=DEVICE)[..., :50257])
    assert not _common.body_aligned(padded, torch.empty_like(odd))  # strides 50304 vs 50257: offsets disagree
    assert not _common.body_aligned(bf.view(2, 2, 50304))  # Triton's specialisation already proves alignment
    assert not _common.body_aligned(odd, torch.empty(2, 2, 50257, dtype=torch.float32, device=DEVICE))  # sizes
    f32 = torch.empty(2, 3, 50257, dtype=torch.float32, device=DEVICE)
    assert _common.body_aligned(f32, torch.empty_like(f32))


@triton.jit
def _blocks_kernel(off_ptr, out_ptr, V, BLOCK_V: tl.constexpr, VEC: tl.constexpr):
    i = tl.program_id(0)
    shift, base, end, whole_end = _common.aligned_blocks(tl.load(off_ptr + i), V, BLOCK_V, VEC)
    tl.store(out_ptr + 4 * i, shift.to(tl.int64))
    tl.store(out_ptr + 4 * i + 1, base)
    tl.store(out_ptr + 4 * i + 2, end.to(tl.int64))
    tl.store(out_ptr + 4 * i + 3, whole_end.to(tl.int64))


@pytest.mark.parametrize("vec", [2, 4, 8])
@pytest.mark.parametrize("V", [1, 7, 198, 50257])
def test_aligned_blocks_start_on_a_vector_boundary(vec, V):
    """What the 16-byte hints rest on (the interpreter ignores them, so the walks' agreement alone cannot tell):
    ``base`` is a multiple of ``VEC`` at or before the row, ``end - shift = V``, and blocks ``1 .. whole_end - 1``
    lie inside ``[shift, end)``."""
    offs = torch.arange(0, 40, dtype=torch.int64, device=DEVICE) * 50257 + 3  # every residue modulo 8
    out = torch.empty(offs.numel(), 4, dtype=torch.int64, device=DEVICE)
    _blocks_kernel[(offs.numel(),)](offs, out, V, BLOCK_V=64, VEC=vec)
    shift, base, end, whole_end = out.unbind(1)
    assert bool(((base % vec == 0) & (base + shift == offs) & (shift < vec) & (end - shift == V)).all()), out
    assert torch.equal(whole_end, end // 64)
    assert bool((whole_end * 64 <= end).all() and (shift <= 64).all())  # block whole_end - 1 ends inside the row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [198, 301, 7])
def test_forward_walks_agree_up_to_the_order_of_their_sums(monkeypatch, dtype, V):
    """The forwards (logprobs, the PPO term, the exact KL) fold the whole blocks first, then the head and the tail:
    the same sums in another order, so equal to float32 rounding (the oracle tests cover their accuracy)."""
    close = dict(rtol=1e-5, atol=1e-5)
    for case, (x, _) in enumerate(_cases(V, dtype, seed=V + 7)):
        n = tuple(x.shape[:2])
        y = make_targets(n, V, seed=case)
        a, p = _both_walks(monkeypatch, lambda: logprobs.logprobs_fwd(x, y, 0.8, -100))
        for u, w in zip(a, p):
            torch.testing.assert_close(u, w, **close)
        g = torch.Generator().manual_seed(case)
        old, adv, ref = (torch.randn(n, generator=g).to(DEVICE) - 5 for _ in range(3))
        kw = dict(temperature=0.8, ignore_index=-100, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                  clip_low=0.2, clip_high=0.28, dual_clip=3.0)
        a, p = _both_walks(monkeypatch, lambda: ppo.ppo_term_fwd(x, y, old, adv, ref, **kw))
        for u, w in zip(a, p):
            torch.testing.assert_close(u, w, **close)
        r = make_logits((2, 9, V), dtype, seed=case)[:, :-1] if not x.is_contiguous() else make_logits(
            tuple(x.shape), dtype, seed=case)
        a, p = _both_walks(monkeypatch, lambda: kl.kl_divergence_fwd(x, r, 0.9))
        for u, w in zip(a, p):
            torch.testing.assert_close(u, w, **close)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [198, 301])
def test_fused_ppo_results_do_not_depend_on_where_the_gradient_goes(dtype, V):
    """The fused forward-with-gradient sums each row once, for its outputs and its gradient alike: the walk of that
    sum follows the logits alone, so the outputs and the gradient are the same bits whether the gradient goes to a
    fresh contiguous buffer, to a slice of a co-aligned one (``out=``, as ppo_loss does for a view's base) or to one
    whose rows sit at another offset. (H200 run 7: the walk followed the gradient too, and ppo_loss on a view
    ``base[:, :-1]`` at V = 50257 gave a base gradient 1 ulp off the one autograd's slice built.)"""
    x = make_logits((2, 9, V), dtype, seed=V + 11)[:, :-1]
    n = tuple(x.shape[:2])
    y = make_targets(n, V, seed=3)
    g = torch.Generator().manual_seed(4)
    old, adv, ref = (torch.randn(n, generator=g).to(DEVICE) - 5 for _ in range(3))
    w = torch.rand(n, generator=g).to(DEVICE)
    kw = dict(temperature=0.8, ignore_index=-100, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
              clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    placements = {
        "fresh": None,
        "co-aligned slice": torch.empty(2, 9, V, dtype=dtype, device=DEVICE)[:, :-1],
        "other offset": torch.empty(2, 8, V + 3, dtype=dtype, device=DEVICE)[..., :V],
    }
    results = {}
    for name, out in placements.items():
        outputs = ppo.ppo_fused_fwd(x, y, old, adv, ref, w, **kw, out=out)
        results[name] = [t.clone() for t in outputs[:6]] + [(outputs[6] if out is None else out).clone()]
    first = results["fresh"]
    for name, got in results.items():
        for i, (a, b) in enumerate(zip(first, got)):
            assert torch.equal(_bits(a), _bits(b)), f"{name}: output {i} differs from the fresh buffer's"
