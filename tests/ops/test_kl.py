"""``rk.kl_divergence`` on the C++ CPU kernel (``csrc/cpu/kl.cpp``) against the float64 oracle.

The kernel walks each row in chunks of 2048 columns, so these rows span three chunks (V = 4396) and
put maxima, -inf runs, NaN and q = 0 in later chunks. The single-chunk cases (V <= 300), shared with
the Triton kernel, are in tests/triton/test_kl_triton.py.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops import kl as kl_ops
from tests.tolerance import assert_matches_oracle, assert_rows_match_oracle

pytestmark = [
    pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

V = 2 * 2048 + 300  # three chunks, the last partial
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INF = float("inf")


def _rows(n: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def _check(x: torch.Tensor, r: torch.Tensor, temperature: float = 1.0, seed: int = 0) -> None:
    """KL and both gradients of the cpu backend against the oracle (2x the reference-in-dtype error)."""
    dtype = x.dtype
    g = torch.randn(x.shape[:-1], generator=torch.Generator().manual_seed(seed))
    outs = []
    for run, (a, b) in (("cpu", (x, r)), ("ref", (x, r)), ("oracle", (x.double(), r.double()))):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        if run == "cpu":
            kl = rk.kl_divergence(a, b, temperature=temperature, backend="cpu")
        else:
            kl = R.kl_divergence(a, b, temperature=temperature)
        (kl.double() * g.double()).sum().backward()
        outs.append((kl, a.grad, b.grad))
    (kl, dx, dr), (kl_ref, dx_ref, dr_ref), (kl64, dx64, dr64) = outs
    assert kl.dtype == torch.float32 and dx.dtype == dtype and dr.dtype == dtype
    assert_matches_oracle(kl, kl_ref, kl64, dtype, "kl")
    assert_matches_oracle(dx, dx_ref, dx64, dtype, "dlogits")
    assert_matches_oracle(dr, dr_ref, dr64, dtype, "dref_logits")


def _fwd(x: torch.Tensor, r: torch.Tensor, temperature: float = 1.0):
    return [t.double() for t in kl_ops.kl_divergence_fwd(x, r, temperature, "cpu")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_maxima_raised_in_later_chunks(dtype):
    x, r = _rows(4, 1), _rows(4, 1) + _rows(4, 2, scale=0.5)
    ramp = torch.linspace(0.0, 12.0, V)
    x[0] += ramp  # the policy maximum rises in every chunk
    r[0] -= ramp  # the reference maximum stays in chunk 0
    x[1, 3000] += 15.0  # policy maximum in chunk 1, reference in chunk 0, then raised in chunk 2
    r[1, 700] += 12.0
    r[1, 4200] += 20.0
    x[2, 4300] += 200.0  # a raise so large the earlier sums underflow when rescaled
    r[2, 100] += 150.0
    x[3, 2047], r[3, 2048] = 30.0, 30.0  # maxima on either side of a chunk boundary
    _check(x.to(dtype), r.to(dtype), temperature=0.8, seed=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_equal_up_to_a_constant_give_exactly_zero(dtype):
    x = _rows(3, 3)
    x[:, 4000] += 10.0  # maxima in the last chunk
    x[1] += torch.linspace(0.0, 8.0, V)
    x = (x * 2).round() / 2  # halves below 32: x + 64 is exact in every dtype
    x[2, :2100] = -INF  # the whole first chunk and more
    x = x.to(dtype)
    r = x.clone()
    r[1] += 64.0
    assert torch.equal(r[1].double() - 64.0, x[1].double())
    kl = rk.kl_divergence(x, r, temperature=0.7, backend="cpu")
    assert torch.equal(kl, torch.zeros_like(kl))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_huge_float32_logits_keep_the_kl_precise_in_every_row(backend):
    """Each row judged on its own at logits of size 1e4: the KL holds float32 precision (no ``z - lse``
    cancellation in either row's log-softmax), the gradient the documented ``|z|·2^-24`` (README, "Accuracy")."""
    x = _rows(4, 21, scale=1.0) + 1e4
    r = _rows(4, 22, scale=1.0) + 1e4
    x[1] = 1e4  # uniform against noise
    r[2] = -1e4 + _rows(1, 23, scale=1.0)[0]
    kw = dict(temperature=0.7)
    outs = []
    for a, b, fn in ((x, r, lambda a, b: rk.kl_divergence(a, b, backend=backend, **kw)),
                     (x, r, lambda a, b: R.kl_divergence(a, b, **kw)),
                     (x.double(), r.double(), lambda a, b: R.kl_divergence(a, b, **kw))):
        a = a.detach().requires_grad_()
        kl = fn(a, b)
        outs.append((kl.detach(), torch.autograd.grad(kl.sum(), a)[0]))
    assert_rows_match_oracle(outs[0][0], outs[1][0], outs[2][0], torch.float32, f"{backend}/kl")
    z_absmax = torch.maximum(x.abs().amax(-1), r.abs().amax(-1)) / 0.7
    assert_rows_match_oracle(outs[0][1], outs[1][1], outs[2][1], torch.float32, f"{backend}/grad", vocab_last=True,
                             z_absmax=z_absmax)


def test_inf_runs_across_chunks():
    x, r = _rows(4, 4), _rows(4, 5)
    x[0, :2500], r[0, :2300] = -INF, -INF  # empty first chunk in both rows, q = 0 only where p = 0
    x[1, :4200] = -INF  # the policy's mass only in the last chunk
    r[2, :4096] = -INF  # the reference's mass only in the last chunk, where p lives too
    x[2, :4096] = -INF
    x[3, :2048], r[3, :2048] = -INF, -INF
    x[3, 2048:] -= 40.0  # a low start, raised later
    x[3, 4390] = 5.0
    _check(x, r, temperature=0.9, seed=4)
    _, lse_z, lse_r = _fwd(x, r, 0.9)
    torch.testing.assert_close(lse_z, torch.logsumexp(x.double() / 0.9, -1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_r, torch.logsumexp(r.double() / 0.9, -1), rtol=1e-6, atol=1e-5)


def test_q_zero_where_p_positive_gives_inf():
    x, r = _rows(4, 6), _rows(4, 7)
    x[0, 4100], r[0, 4100] = 4.0, -INF  # in the last chunk
    r[1, :2048] = -INF  # the whole first reference chunk where p > 0: +inf before any reference maximum
    x[1, 3500] = 12.0  # carried through later raises of both maxima
    r[1, 3000] = 9.0
    x[2, :2048], r[2, :2048] = -1000.0, -INF  # live (underflowing) p where q = 0, then a raise that
    x[2, 2048:] += 10.0  # underflows their rescale: finite, as the reference
    x[3, ::5], r[3, ::5] = -INF, -INF  # q = 0 only where p = 0: finite
    kl, lse_z, lse_r = _fwd(x, r, 0.8)
    ref = R.kl_divergence(x.double(), r.double(), temperature=0.8)
    assert kl[:2].tolist() == ref[:2].tolist() == [INF, INF]
    assert torch.isfinite(ref[2:]).all()
    assert_matches_oracle(kl[2:], R.kl_divergence(x[2:], r[2:], temperature=0.8), ref[2:], torch.float32, "kl")


def test_nan_in_a_later_chunk_stays_in_its_row_and_statistic():
    x, r = _rows(5, 8), _rows(5, 9)
    x[0, 4000] = float("nan")  # policy, last chunk: its lse and the KL are NaN, lse_r is not
    r[1, 2500] = float("nan")  # reference, middle chunk
    x[2, 3] = float("nan")  # policy, first element
    x[3, 10] = float("nan")
    r[3, 4300] = float("nan")  # both rows
    kl, lse_z, lse_r = _fwd(x, r, 1.3)
    assert torch.isnan(kl).tolist() == [True] * 4 + [False]
    assert torch.isnan(lse_z).tolist() == [True, False, True, True, False]
    assert torch.isnan(lse_r).tolist() == [False, True, False, True, False]
    ok_z, ok_r = ~torch.isnan(lse_z), ~torch.isnan(lse_r)
    torch.testing.assert_close(lse_z[ok_z], torch.logsumexp(x.double() / 1.3, -1)[ok_z], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse_r[ok_r], torch.logsumexp(r.double() / 1.3, -1)[ok_r], rtol=1e-6, atol=1e-5)
    _check(x[4:], r[4:], temperature=1.3, seed=8)


def test_mixed_dtypes_and_strided_rows():
    base = _rows(6, 10).reshape(2, 3, V)
    x = base[:, 1:]  # rows of a larger tensor
    r = _rows(4, 11).reshape(2, 2, V).to(torch.bfloat16)
    kl = rk.kl_divergence(x, r, temperature=1.1, backend="cpu")
    ref = R.kl_divergence(x.double(), r.double(), temperature=1.1)
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)


def test_threads_give_the_same_bits():
    """Rows are independent: any split of them over threads gives identical results."""
    x, r = _rows(64, 12), _rows(64, 13)
    x.requires_grad_(), r.requires_grad_()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            kl = rk.kl_divergence(x, r, backend="cpu")
            dx, dr = torch.autograd.grad(kl.sum(), (x, r))
            results.append((kl, dx, dr))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_layouts_are_clear_errors():
    x, r = _rows(2, 14), _rows(2, 15)
    with pytest.raises(RuntimeError, match="unit stride over the vocabulary"):
        torch.ops.rlhf_kernels_C.kl_divergence_fwd(x.t().contiguous().t()[None], r[None], 1.0)
    with pytest.raises(RuntimeError, match="one shape"):
        torch.ops.rlhf_kernels_C.kl_divergence_fwd(x[None], r[None, :1], 1.0)
    kl, lz, lr = torch.ops.rlhf_kernels_C.kl_divergence_fwd(x[None], r[None], 1.0)
    with pytest.raises(RuntimeError, match="grad must have B\\*T = 2 elements"):
        torch.ops.rlhf_kernels_C.kl_divergence_bwd(kl[:, :1], x[None], r[None], kl, lz, lr, 1.0, True)


def test_the_backward_refuses_a_gradient_over_part_of_either_input():
    """The C++ backward may write dlogits over the logits themselves (``kl_divergence(overwrite_logits=True)``),
    never over a shifted view of them or of the reference: a gradient written there would be read back as input."""
    big, ref = _rows(8, 16).reshape(2, 4, V), _rows(6, 17).reshape(2, 3, V)
    x = big[:, :3]
    kl, lz, lr = torch.ops.rlhf_kernels_C.kl_divergence_fwd(x, ref, 1.0)
    g = torch.ones_like(kl)
    with pytest.raises(RuntimeError, match="grad_out may overlap logits only by being logits itself"):
        torch.ops.rlhf_kernels_C.kl_divergence_bwd(g, x, ref, kl, lz, lr, 1.0, False, big[:, 1:], None)
    refs = torch.cat([ref, ref[:, :1]], 1)  # the reference, with a shifted view of it to write into
    with pytest.raises(RuntimeError, match="grad_out may overlap ref_logits only by being ref_logits itself"):
        torch.ops.rlhf_kernels_C.kl_divergence_bwd(g, x, refs[:, :3], kl, lz, lr, 1.0, False, refs[:, 1:], None)
    expected, _ = torch.ops.rlhf_kernels_C.kl_divergence_bwd(g, x, ref, kl, lz, lr, 1.0, False, None, None)
    torch.ops.rlhf_kernels_C.kl_divergence_bwd(g, x, ref, kl, lz, lr, 1.0, False, x, None)  # over themselves
    assert torch.equal(x, expected)
