"""``benchmarks/tune_triton.py`` launches the Triton kernels directly (to time configurations the autotuner may not
pick), so its call sites must follow the kernels' signatures. Run on a GPU session's clock, a stale call site costs
that session's sweep (2026-11-26: the backward's output strides were missing). Here, under the interpreter at a tiny
shape, each call site runs and agrees with the op it stands for."""

from __future__ import annotations

import pytest
import torch
from triton_testutils import DEVICE, make_logits, make_targets

import rlhf_kernels as rk
from benchmarks import tune_triton as tune

V = 37


def _case(seed):
    rows = make_logits((1, 3, V), torch.float32, seed=seed, device=DEVICE)
    y = make_targets((1, 3), V, seed=seed + 1, device=DEVICE)
    return rows, y


@pytest.mark.parametrize("block, lanes, warps", [(64, 64, 1), (64, 32, 1)])
def test_forward_call_matches_the_op(block, lanes, warps):
    rows, y = _case(1)
    logp, entropy, _ = tune.fwd_shipped(rows, y, block, lanes, warps)
    expected = rk.logprobs(rows, y, return_entropy=True, backend="triton")
    torch.testing.assert_close(logp, expected[0])
    torch.testing.assert_close(entropy, expected[1])


def test_backward_call_matches_autograd():
    rows, y = _case(3)
    stats = tune.fwd_shipped(rows, y, 64, 64, 1)
    grad = tune.bwd_cfg(rows, y, stats, 64, 1)  # upstream gradient 1 for logp and for the entropy
    x = rows.clone().requires_grad_()
    logp, entropy = rk.logprobs(x, y, return_entropy=True, backend="triton")
    (expected,) = torch.autograd.grad(logp.sum() + entropy.sum(), x)
    torch.testing.assert_close(grad, expected)


def test_kl_forward_call_matches_the_op():
    rows, _ = _case(5)
    ref, _ = _case(7)
    kl = tune.kl_cfg(rows, ref, 64, 64, 1)[0]
    torch.testing.assert_close(kl, rk.kl_divergence(rows, ref, backend="triton"))
