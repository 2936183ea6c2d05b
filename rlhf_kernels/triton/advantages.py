"""Triton kernel for GAE: a reverse scan over time, replacing the Python time loop.

Each program owns ``BLOCK_B`` sequences (one per lane; ``BLOCK_B = 1`` is one
program per sequence) and walks ``t = T-1 … 0``::

    δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t;   A_t = δ_t + γλ·A_{t+1}·m_{t+1}
    advantages = A·m;   returns = (A + V)·m

(0 where ``m = 0``, and a masked step carries nothing back, whatever its ``r`` and ``V`` hold) in fp32, written in
``values``' dtype. Inputs are made contiguous ``[B, T]``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import _common
from ._common import device_guard, next_pow2


@triton.jit
def _gae_fwd_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, B, T, gamma, gamma_lam, BLOCK_B: tl.constexpr):
    seqs = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = seqs < B
    base = seqs * T
    next_v = tl.zeros([BLOCK_B], tl.float32)
    next_a = tl.zeros([BLOCK_B], tl.float32)
    next_m = tl.zeros([BLOCK_B], tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        r = tl.load(r_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + base + t, mask=live, other=0.0).to(tl.float32)
        a = r + gamma * next_v * next_m - v + gamma_lam * next_a * next_m
        on = m != 0
        tl.store(adv_ptr + base + t, tl.where(on, a * m, 0.0).to(adv_ptr.dtype.element_ty), mask=live)
        tl.store(ret_ptr + base + t, tl.where(on, (a + v) * m, 0.0).to(ret_ptr.dtype.element_ty), mask=live)
        # a masked step passes nothing back: padding's V or r may be NaN / inf, and 0·inf is NaN
        next_v = tl.where(on, v, 0.0)
        next_a = tl.where(on, a, 0.0)
        next_m = m


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards, values, mask[B, T]`` -> ``(advantages, returns)``, ``[B, T]`` in ``values.dtype``."""
    B, T = values.shape
    adv = _common.alloc((B, T), values.dtype, values.device)
    ret = _common.alloc(adv.shape, adv.dtype, adv.device)
    if adv.numel() == 0:
        return adv, ret
    rewards = rewards.contiguous()
    values = values.contiguous()
    mask = mask.to(torch.float32).contiguous()
    block_b = min(next_pow2(B), 32 if values.device.type == "cuda" else 64)
    with device_guard(values):
        _gae_fwd_kernel[(triton.cdiv(B, block_b),)](
            rewards, values, mask, adv, ret, B, T, float(gamma), float(gamma) * float(lam), BLOCK_B=block_b, num_warps=1
        )
    return adv, ret
