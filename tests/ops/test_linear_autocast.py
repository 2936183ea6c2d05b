"""The fused-linear ops under ``torch.autocast`` (on the CPU; on CUDA too under ``pytest -m gpu``).

Like ``F.linear``, every GEMM runs in the autocast dtype, on every path (row chunks, vocabulary slabs, the frozen
head, the losses' gradient in the forward), and the gradients reach float32 leaves through the casts. Before, the
row chunks ran float32 GEMMs (``torch.mm(..., out=)`` is not autocast) and the slabs bf16 ones.
"""

from __future__ import annotations

import pytest
import torch
import rlhf_kernels as rk
from tests.ops.test_linear import _MatmulCounter

AC = torch.bfloat16
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


class _GemmDtypes(_MatmulCounter):
    """Also records the dtypes of the floating operands of every GEMM, inside the fused-linear ops' bodies."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and func.overloadpacket.__name__ in self._MATMULS:
            self.dtypes |= {a.dtype for a in args[:3] if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return super().__torch_dispatch__(func, types, args, kwargs)


def _leaves(dtype=torch.float32, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, 24, generator=g).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(301, 24, generator=g) * 0.3).to(device, dtype).requires_grad_(True)
    b = (torch.randn(301, generator=g) * 0.1).to(device, dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, 301, (2, 9), generator=g).to(device)
    targets[0, 3] = -100
    return hidden, weight, b, targets


def _ppo_extras(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(2, 9, generator=g) * 5
    adv = torch.randn(2, 9, generator=g)
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    return old.to(device), adv.to(device), mask.to(device)


CALLS = {
    "logprobs rows": lambda h, w, b, t: rk.linear_logprobs(h, w, t, b, chunk_size=5, chunk_by="rows",
                                                           return_entropy=True),
    "logprobs vocab": lambda h, w, b, t: rk.linear_logprobs(h, w, t, b, chunk_size=64, chunk_by="vocab",
                                                            return_entropy=True),
    "cross-entropy in forward": lambda h, w, b, t: rk.linear_cross_entropy(h, w, t, b, chunk_size=5),
    "cross-entropy vocab": lambda h, w, b, t: rk.linear_cross_entropy(h, w, t, b, chunk_size=64, chunk_by="vocab"),
    "cross-entropy none": lambda h, w, b, t: rk.linear_cross_entropy(h, w, t, b, reduction="none", chunk_size=5),
    "ppo": lambda h, w, b, t: rk.linear_ppo_loss(h, w, t, *_ppo_extras(h.device), bias=b, chunk_size=5, kl_coef=0.0,
                                                 loss_agg="seq-mean-token-mean").loss,
}


def _run(call, leaves, autocast, cast=None):
    """Forward and backward of ``call`` under a ``_GemmDtypes``: ``(outputs, leaves' gradients, mode)``. With
    ``cast``, the op gets the leaves' casts to that dtype (the gradients still land on the leaves)."""
    hidden, weight, bias, targets = leaves
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    with torch.autocast(hidden.device.type, dtype=AC, enabled=autocast), _GemmDtypes() as mode:
        args = [t if t is None or cast is None else t.to(cast) for t in (hidden, weight, bias)]
        out = call(*args, targets)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()
    grads = tuple(None if t is None else t.grad for t in (hidden, weight, bias))
    return tuple(o.detach() for o in outs), grads, mode


def _assert_as_on_bf16_inputs(name, call, leaves):
    """Under autocast with float32 leaves: the same GEMMs, in the same dtypes, and the same numbers as the op
    called outside autocast on the bf16 casts of the leaves (bf16 GEMMs for the logits; float32 ones only where
    the op accumulates a gradient in float32 by design), float32 outputs, and float32 gradients on the float32
    leaves, flowing back through the casts as from ``F.linear``."""
    outs, grads, mode = _run(call, leaves, autocast=True)
    want, want_grads, want_mode = _run(call, leaves, autocast=False, cast=AC)
    assert all(o.dtype == torch.float32 for o in outs)
    assert all(g is None or g.dtype == torch.float32 for g in grads)
    assert AC in mode.dtypes and (mode.matmuls, mode.dtypes) == (want_mode.matmuls, want_mode.dtypes), name
    for got, exp in zip(outs + grads, want + want_grads):
        if got is not None:
            torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CALLS))
def test_autocast_runs_the_op_as_on_bf16_inputs_like_f_linear(name, device):
    _assert_as_on_bf16_inputs(name, CALLS[name], _leaves(device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_frozen_head_path(device):
    """The frozen-head path (only ``hidden`` needs a gradient, no entropy) under autocast."""
    hidden, weight, _, targets = _leaves(bias=False, device=device)
    weight.requires_grad_(False)
    frozen = lambda h, w, b, t: rk.linear_logprobs(h, w, t, chunk_size=5)  # noqa: E731
    _assert_as_on_bf16_inputs("frozen head", frozen, (hidden, weight, None, targets))


def test_autocast_leaves_float64_and_no_autocast_alone():
    """float64 inputs are not cast (autocast leaves float64 as it is), and outside autocast nothing is cast."""
    for dtype, autocast in ((torch.float64, True), (torch.float32, False)):
        outs, _, mode = _run(CALLS["logprobs rows"], _leaves(dtype), autocast)
        assert mode.dtypes == {dtype} and outs[0].dtype == dtype
