"""gae: generalised advantage estimation over ``rewards, values, mask [B, T]`` (no gradient).

Eager is the reverse Python loop over time steps that TRL's PPO trainer and
most RL code use (written here from the formula
``δ_t = r_t + γ·V_{t+1}·m_{t+1} - V_t``, ``A_t = δ_t + γλ·A_{t+1}·m_{t+1}``).
``torch.compile`` of that loop unrolls ``T`` steps and is not measured; there
is no chunked or Liger-Kernel equivalent. Bytes that must move: the three
inputs read once, advantages and returns written once.
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from .providers import OURS, Case, OpSpec, Provider, our_reason

GAMMA, LAM = 1.0, 0.95


def eager_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
    T = values.shape[1]
    m = mask.to(values.dtype)
    last = torch.zeros_like(values[:, 0])
    adv = []
    for t in reversed(range(T)):
        next_v = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_m = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + GAMMA * next_v - values[:, t]
        last = delta + GAMMA * LAM * last * next_m
        adv.append(last)
    advantages = torch.stack(adv[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def make_inputs(case: Case, device: torch.device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)  # small: drawn on the host
    B, T = case.B, case.T
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=g) * 0.1
    values = torch.randn(B, T, generator=g)
    to = lambda t: t.to(device=device, dtype=case.dtype).contiguous()  # noqa: E731
    return {"rewards": to(rewards), "values": to(values), "mask": to(mask)}


def _probe(backend, device):
    x = torch.randn(2, 5, device=device)
    rk.gae(x, x, torch.ones_like(x), backend=backend)


def _ours(backend):
    return lambda i: lambda: rk.gae(i["rewards"], i["values"], i["mask"], gamma=GAMMA, lam=LAM, backend=backend)


def _skip(why):
    return Provider(build=lambda i: None, reason=lambda case, device: why)


providers = {
    "eager": Provider(lambda i: lambda: eager_gae(i["rewards"], i["values"], i["mask"])),
    "compile": _skip("torch.compile of the time loop unrolls T steps (minutes to compile); not measured"),
    "chunked": _skip("no chunked variant: GAE has no vocabulary dimension"),
    "liger": _skip("no Liger-Kernel equivalent: Liger-Kernel has no advantage estimator"),
}
for _b in OURS:
    providers[_b] = Provider(_ours(_b), our_reason("gae", rk.gae, _b, _probe))


def bytes_moved(case: Case, mode: str) -> float:
    return 5.0 * case.B * case.T * case.elem


OPS = {
    "gae": OpSpec(
        name="gae",
        family="scan",
        make_inputs=make_inputs,
        grad_names=(),
        providers=providers,
        bytes_moved=bytes_moved,
        modes=("fwd",),
        description="GAE reverse scan over rewards / values / mask [B, T] (γ=1, λ=0.95)",
    )
}
