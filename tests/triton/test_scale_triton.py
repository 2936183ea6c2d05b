"""``triton.scale.scale_unless_one_``: the fused losses' backward scale where the extension's CUDA kernels do not run
(a Triton-only install): nothing written when the scale is 1, else ``x·scale`` rounded once, every element."""

import pytest
import torch

from rlhf_kernels.triton.scale import scale_unless_one_
from triton_testutils import DEVICE, DTYPES, INTERPRET


def _rounded(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (float32) in ``dtype`` as the kernel rounds it: to nearest, except to bf16 under Triton's interpreter,
    which truncates (``tests/tolerance.py``: ``interpreter_bf16_allowance``)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return (v.view(torch.int32) & -65536).view(torch.float32).to(dtype)  # (exact: the low half is 0)
    return v.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4096, 3 * 4096 + 5, 40000])  # one block, several, more than the programs
def test_scales_every_element_in_float32_rounded_once(dtype, n):
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * 3).to(dtype).to(DEVICE)
    for value in (0.37, -3.0, 0.0):
        y = x.clone()
        out = scale_unless_one_(y, torch.tensor(value, device=DEVICE))
        assert out is y
        assert torch.equal(y, _rounded(x.float() * value, dtype)), value


def test_a_scale_of_one_writes_nothing():
    """Where the scale is 1 the kernel returns before touching ``x``: even NaN payloads keep their bits."""
    signalling_nans = torch.arange(0x7F800001, 0x7F800001 + 5000, dtype=torch.int32)
    bits = torch.cat([torch.arange(-20000, 20000, dtype=torch.int32), signalling_nans]).to(DEVICE)
    x = bits.clone().view(torch.float32)  # NaN payloads, signalling NaNs and subnormals, whose bits x·1 would change
    scale_unless_one_(x, torch.ones((), device=DEVICE))
    assert torch.equal(x.view(torch.int32), bits)
    y = torch.randn(5, 7, device=DEVICE, dtype=torch.bfloat16)
    before = y.clone()
    scale_unless_one_(y, torch.ones(1, dtype=torch.float64, device=DEVICE))
    assert torch.equal(y, before)


def test_bad_arguments_are_named():
    x = torch.zeros(4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="x must be contiguous"):
        scale_unless_one_(x.t(), torch.ones((), device=DEVICE))
    with pytest.raises(ValueError, match="scale must be one element"):
        scale_unless_one_(x, torch.ones(2, device=DEVICE))
    assert scale_unless_one_(torch.zeros(0, device=DEVICE), torch.full((), 2.0, device=DEVICE)).numel() == 0
