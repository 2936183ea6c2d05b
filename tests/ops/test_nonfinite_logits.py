"""Non-finite logits on every backend against the float64 oracle (DESIGN §2: NaN / Inf propagate to their token only).

A +inf logit makes the row's log-sum-exp infinite, so its log-prob, entropy and KL are ``-inf`` or ``inf - inf``:
the oracle gives NaN for all three, and so must every backend (the C++ CPU log-prob gave ``-inf`` where the target
was finite, its shifted exponentials having reached a vector exp that clamps NaN). In the backward a token whose
output is NaN gets a gradient row holding NaN, never a quiet 0 that would hide it (the C++ CPU KL backward wrote 0
in the rows of a NaN policy logit and finite reference gradients in every NaN row, where Triton and CUDA keep NaN);
every other row equals the oracle. Each row of the batch holds one kind of value, so a value leaking into another
row shows as a wrong row. On a GPU (``pytest -m gpu``) the Triton and CUDA kernels run the same cases.
"""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels import reference as R
from rlhf_kernels.ops._dispatch import triton_importable, triton_interpreting
from tests.tolerance import assert_matches_oracle

INF, NAN = float("inf"), float("nan")
V = 300
INTERPRETED_TRITON = triton_importable() and triton_interpreting()
CPU_BACKENDS = ["torch"] + (["cpu"] if _ext.available() else []) + (["triton"] if INTERPRETED_TRITON else [])
GPU_BACKENDS = ["triton"] + (["cuda"] if _ext.available() and _ext.has_cuda_kernels() else [])

# row -> (policy entries, reference entries) as {column: value}; targets below. Rows 0-7 hold a non-finite value
# that spoils their outputs, rows 8-10 only -inf entries (valid: a masked vocabulary), row 11 none, rows 12-13 a
# wholly masked row (no distribution: the oracle's 0/0 is NaN; a kernel's sums that start at 0 must stay 0 there).
ROWS = [
    ({40: NAN}, {}),  # NaN policy logit
    ({}, {40: NAN}),  # NaN reference logit (log-prob and entropy fine, KL NaN)
    ({5: INF}, {}),  # +inf away from the target: lse = inf, log-prob -inf - inf
    ({7: INF}, {}),  # +inf at the target: inf - inf
    ({5: INF, 9: INF}, {}),  # two +inf
    ({}, {9: INF}),  # +inf in the reference row
    ({5: -INF}, {5: NAN}),  # NaN reference logit where p = 0
    ({V - 1: NAN}, {}),  # NaN in the last column (the row's tail)
    ({c: -INF for c in range(0, V, 3)}, {c: -INF for c in range(0, V, 3)}),  # a third of the vocabulary masked
    ({c: -INF for c in range(V) if c != 7}, {c: -INF for c in range(V) if c != 8}),  # one live column each: KL inf
    ({c: -INF for c in range(V) if c != 7}, {}),  # one-hot policy
    ({}, {}),
    ({c: -INF for c in range(V)}, {c: -INF for c in range(V)}),  # both rows wholly masked: 0/0, NaN everywhere
    ({c: -INF for c in range(V)}, {}),  # the policy row wholly masked
]
TARGETS = [3, 3, 3, 7, 3, 3, 3, 3, 4, 7, 7, 3, 3, 3]


def _inputs(device):
    g = torch.Generator().manual_seed(31)
    x, r = torch.randn(len(ROWS), V, generator=g) * 2, torch.randn(len(ROWS), V, generator=g) * 2
    for row, (xs, rs) in enumerate(ROWS):
        for col, value in xs.items():
            x[row, col] = value
        for col, value in rs.items():
            r[row, col] = value
    return x.to(device), r.to(device), torch.tensor(TARGETS, device=device)


def _assert_gradient_rows(grad: torch.Tensor, oracle: torch.Tensor, spoiled: torch.Tensor, what: str,
                          unchecked=()) -> None:
    """NaN in every row whose output is NaN (spoiled), the oracle's values (finite) in every other row but
    ``unchecked``."""
    grad, oracle, spoiled = grad.double().cpu(), oracle.cpu(), spoiled.cpu()
    has_nan = torch.isnan(grad).any(-1)
    assert has_nan[spoiled].all(), f"{what}: rows {spoiled.nonzero().flatten().tolist()} hide their NaN: " \
        f"NaN in {has_nan.nonzero().flatten().tolist()}"
    clean = ~spoiled
    clean[list(unchecked)] = False
    assert torch.isfinite(grad[clean]).all(), f"{what}: non-finite gradient in a clean row"
    torch.testing.assert_close(grad[clean], oracle[clean], rtol=1e-4, atol=1e-6, msg=what)


def _check_logprobs(backend, device):
    x, _, y = _inputs(device)
    xt = x.clone().requires_grad_()
    logp, ent = rk.logprobs(xt, y, temperature=1.3, return_entropy=True, backend=backend)
    g1, g2 = torch.linspace(-1, 1, len(ROWS), device=device), torch.linspace(0.5, -0.7, len(ROWS), device=device)
    ((logp * g1).sum() + (ent * g2).sum()).backward()
    x64 = x.double().cpu().requires_grad_()
    o_logp, o_ent = R.logprobs(x64, y.cpu(), temperature=1.3, return_entropy=True)
    ((o_logp * g1.double().cpu()).sum() + (o_ent * g2.double().cpu()).sum()).backward()
    ref_logp, ref_ent = R.logprobs(x.cpu(), y.cpu(), temperature=1.3, return_entropy=True)
    assert_matches_oracle(logp, ref_logp, o_logp, torch.float32, "logp")
    assert_matches_oracle(ent, ref_ent, o_ent, torch.float32, "entropy")
    assert torch.isnan(o_logp[:8]).tolist() == [True, False, True, True, True, False, False, True]
    _assert_gradient_rows(xt.grad, x64.grad, torch.isnan(o_logp) | torch.isnan(o_ent), f"{backend} logprobs dlogits")


def _check_kl(backend, device):
    x, r, _ = _inputs(device)
    xt, rt = x.clone().requires_grad_(), r.clone().requires_grad_()
    kl = rk.kl_divergence(xt, rt, temperature=0.9, backend=backend)
    # row 9's KL is +inf: no upstream gradient there (its gradient, 0 in the kernels, NaN in the oracle's autograd,
    # is left unchecked; test_kl_triton's masked infinite-KL rows cover it)
    g = torch.linspace(-1, 1, len(ROWS), device=device).index_fill(0, torch.tensor([9], device=device), 0.0)
    (kl * g).sum().backward()
    x64, r64 = x.double().cpu().requires_grad_(), r.double().cpu().requires_grad_()
    o_kl = R.kl_divergence(x64, r64, temperature=0.9)
    (o_kl * g.double().cpu()).sum().backward()
    assert_matches_oracle(kl, R.kl_divergence(x.cpu(), r.cpu(), temperature=0.9), o_kl, torch.float32, "kl")
    assert torch.isnan(o_kl[:8]).all() and o_kl[9] == INF
    spoiled = torch.isnan(o_kl)
    _assert_gradient_rows(xt.grad, x64.grad, spoiled, f"{backend} kl dlogits", unchecked=[9])
    _assert_gradient_rows(rt.grad, r64.grad, spoiled, f"{backend} kl dref", unchecked=[9])


def _check_ppo(backend, device):
    x, r, y = _inputs(device)
    n = len(ROWS)
    old = torch.linspace(-6, -2, n, device=device)
    adv = torch.linspace(-1, 1.5, n, device=device)
    ref = torch.linspace(-5, -3, n, device=device)
    mask = torch.ones(n, device=device)
    kwargs = dict(ref_logp=ref, kl_coef=0.05, entropy_coef=0.01, temperature=1.3)
    xt = x.clone().requires_grad_()
    rk.ppo_loss(xt, y, old, adv, mask, backend=backend, **kwargs).loss.backward()
    x64 = x.double().cpu().requires_grad_()
    cpu = [t.double().cpu() for t in (old, adv, mask, ref)]
    R.ppo_loss(x64, y.cpu(), cpu[0], cpu[1], cpu[2], **{**kwargs, "ref_logp": cpu[3]})[0].backward()
    o_logp, o_ent = R.logprobs(x.double().cpu(), y.cpu(), temperature=1.3, return_entropy=True)
    spoiled = torch.isnan(o_logp) | torch.isnan(o_ent)
    # the oracle's loss is NaN, so its gradient is NaN in every row: compare the clean rows with a clean batch's
    clean = ~spoiled
    x_clean = x.double().cpu()[clean].requires_grad_()
    c = [t[clean] for t in cpu]
    loss = R.ppo_loss(x_clean, y.cpu()[clean], c[0], c[1], c[2], **{**kwargs, "ref_logp": c[3]})[0]
    (loss * clean.sum() / len(ROWS)).backward()  # token-mean over all rows: each clean row's weight is 1 / n
    oracle = torch.zeros(len(ROWS), V, dtype=torch.float64)
    oracle[clean] = x_clean.grad
    _assert_gradient_rows(xt.grad, oracle, spoiled, f"{backend} ppo_loss dlogits")


CHECKS = {"logprobs": _check_logprobs, "kl_divergence": _check_kl, "ppo_loss": _check_ppo}


@pytest.mark.parametrize("op", sorted(CHECKS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nonfinite_logits_match_the_oracle_row_by_row(op, backend):
    CHECKS[op](backend, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", sorted(CHECKS))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nonfinite_logits_match_the_oracle_row_by_row_on_the_gpu(op, backend):
    CHECKS[op](backend, torch.device("cuda"))
