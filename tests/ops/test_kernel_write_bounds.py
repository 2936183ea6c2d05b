"""The C++ backward kernels (CPU, and CUDA under ``pytest -m gpu``) write their gradient rows and nothing else.

Each gradient is written into a strided view ``pad[..., :V]`` of a buffer ``pad[B, T, V + 8]`` filled with a
sentinel: the 8 columns after each row must keep it, and the rows must equal the kernel's contiguous output. An
unpadded buffer cannot show a write one element past a row (the next row overwrites it, or it lands past the
tensor): the KL backward's bf16 copy-out loop run to ``j <= n`` wrote ``dz[V]`` and ``dr[V]`` of every row and
passed every other test. V = 2053 and 4096 take the kernels over two vocabulary chunks (of 2048), the first with a
short last chunk.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_kernels import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the C++ extension is not built")

SENTINEL = 1234.0  # exact in bf16 and fp32, and no gradient value
PAD = 8
# CUDA too: its rows of V + 8 elements start off the 16-byte alignment its vectorised stores prefer
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs a CUDA device")])]


def _padded(B, T, V, dtype, device):
    pad = torch.full((B, T, V + PAD), SENTINEL, dtype=dtype, device=device)
    return pad, pad[..., :V]


def _assert_only_rows_written(pad, V, expected, what):
    assert torch.equal(pad[..., V:], torch.full_like(pad[..., V:], SENTINEL)), f"{what}: wrote past its rows"
    assert torch.equal(pad[..., :V], expected), f"{what}: rows differ from the contiguous output"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [7, 2053, 4096])
def test_logprobs_backward_writes_only_its_rows(device, dtype, V):
    g = torch.Generator().manual_seed(V)
    B, T = 2, 3
    x = torch.randn(B, T, V, generator=g).to(device, dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 0], y[1, 2] = V - 1, -100  # the last column's one-hot; an ignored row (written as zeros)
    y = y.to(device)
    ops = torch.ops.rlhf_kernels_C
    _, entropy, lse = ops.logprobs_fwd(x, y, 0.9, -100)
    g_logp, g_ent = (torch.rand(B, T, generator=g) + 0.5).to(device), torch.randn(B, T, generator=g).to(device)
    pad, grad = _padded(B, T, V, dtype, device)
    ops.logprobs_bwd_out(g_logp, g_ent, x, y, lse, entropy, 0.9, -100, grad)
    _assert_only_rows_written(pad, V, ops.logprobs_bwd(g_logp, g_ent, x, y, lse, entropy, 0.9, -100), "dlogits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V", [7, 2053, 4096])
def test_kl_backward_writes_only_its_rows(device, dtype, V):
    g = torch.Generator().manual_seed(V + 1)
    B, T = 2, 3
    z = torch.randn(B, T, V, generator=g).to(device, dtype)
    r = torch.randn(B, T, V, generator=g).to(device, dtype)
    ops = torch.ops.rlhf_kernels_C
    kl, lse_z, lse_r = ops.kl_divergence_fwd(z, r, 0.9)
    grad = (torch.rand(B, T, generator=g) + 0.5).to(device)
    dz_expected, dr_expected = ops.kl_divergence_bwd(grad, z, r, kl, lse_z, lse_r, 0.9, True, None, None)
    pad_z, dz = _padded(B, T, V, dtype, device)
    pad_r, dr = _padded(B, T, V, dtype, device)
    ops.kl_divergence_bwd(grad, z, r, kl, lse_z, lse_r, 0.9, True, dz, dr)
    _assert_only_rows_written(pad_z, V, dz_expected, "dz")
    _assert_only_rows_written(pad_r, V, dr_expected, "dr")
