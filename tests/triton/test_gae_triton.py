"""Triton GAE reverse scan vs the float64 oracle."""

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels import reference
from rlhf_kernels.ops import advantages as adv_ops
from triton_testutils import DEVICE, assert_rule, poisoned_outputs


def _inputs(B, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g).to(dtype).to(DEVICE)
    values = torch.randn(B, T, generator=g).to(dtype).to(DEVICE)
    # right-padded sequences plus scattered holes
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.1
    return rewards, values, mask.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (70, 9), (2, 200)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    rewards, values, mask = _inputs(*shape, dtype, seed=shape[0] * 31 + shape[1])
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0)):
        with poisoned_outputs():
            adv, ret = rk.gae(rewards, values, mask, gamma=gamma, lam=lam, backend="triton")
        assert adv.dtype == dtype and ret.dtype == dtype
        adv64, ret64 = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
        advl, retl = reference.gae(rewards, values, mask, gamma=gamma, lam=lam)
        assert_rule("advantages", adv, advl, adv64, dtype)
        assert_rule("returns", ret, retl, ret64, dtype)
        assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_mask_dtypes_and_non_contiguous():
    rewards, values, mask = _inputs(6, 11, torch.float32, seed=5)
    expect = reference.gae(rewards.double(), values.double(), mask, gamma=0.97, lam=0.9)
    for m in (mask, mask.float(), mask.long()):
        got = rk.gae(rewards.t().contiguous().t(), values, m, gamma=0.97, lam=0.9, backend="triton")
        for a, b in zip(got, expect):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_backend_order_prefers_triton_on_cuda():
    assert adv_ops.IMPLEMENTED[0] == "triton"
    if torch.cuda.is_available():
        from rlhf_kernels.ops._dispatch import resolve_backend

        assert resolve_backend("gae", torch.device("cuda"), None, adv_ops.IMPLEMENTED) == "triton"
