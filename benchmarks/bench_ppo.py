"""ppo_loss: PPO clipped policy loss (k3 KL penalty, token-mean) straight from ``logits[B, T+1, V]``.

Every provider gets the model's output ``logits[B, T+1, V]`` and scores the
``T`` completion positions as users do, through the view ``logits[:, :-1]``
(Liger-Kernel's GRPO loss takes the full tensor itself). Per token:
``r = exp(logp - old_logp)``, ``pg = max(-A·r, -A·clip(r, 0.8, 1.2))``,
``term = pg + 0.04·k3(logp, ref_logp)``; the loss is the masked token mean.
Eager / chunked also compute the entropy (without gradient) for logging, as
the trainers of TRL and verl do; ours returns it from the same pass.
Liger-Kernel's equivalent: ``triton_grpo_loss(loss_type="bnpo")`` (token
mean), with its default ``inplace=True`` (the gradient overwrites the logits).
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from .providers import (
    COMPETITORS,
    OURS,
    Case,
    OpSpec,
    Provider,
    chunked_logprobs,
    compile_reason,
    compiled,
    eager_logprobs,
    generator,
    liger_reason,
    measured_under,
    our_reason,
    randint,
    randn,
)

KL_COEF = 0.04
CLIP = 0.2


def _ppo_terms(logp, old_logp, advantages, ref_logp, mask):
    ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - CLIP, 1.0 + CLIP))
    d = ref_logp - logp
    term = pg + KL_COEF * (d.exp() - d - 1.0)
    maskf = mask.float()
    return (term * maskf).sum() / maskf.sum().clamp(min=1.0)


def eager_ppo(logits, targets, old_logp, advantages, ref_logp, mask):
    (logp,) = eager_logprobs(logits, targets, entropy=False)
    with torch.no_grad():
        z = logits.float()
        entropy = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)  # logged, not differentiated
    return _ppo_terms(logp, old_logp, advantages, ref_logp, mask), entropy


def chunked_ppo(logits, targets, old_logp, advantages, ref_logp, mask):
    (logp,) = chunked_logprobs(logits, targets, entropy=False)
    with torch.no_grad():
        _, entropy = chunked_logprobs(logits, targets, entropy=True)
    return _ppo_terms(logp, old_logp, advantages, ref_logp, mask), entropy


def make_inputs(case: Case, device: torch.device, seed: int):
    g = generator(device, seed)
    B, T, V = case.B, case.T, case.V
    logits = randn((B, T + 1, V), g, device, case.dtype, 2.0)
    targets = randint(V, (B, T), g, device)
    with torch.no_grad():
        # Near-on-policy old / ref log-probs; chunked so no [N, V] float32 temporary is made here.
        (logp,) = chunked_logprobs(logits[:, :-1], targets, entropy=False)
    old_logp = logp + randn((B, T), g, device, torch.float32, 0.1)
    ref_logp = logp + randn((B, T), g, device, torch.float32, 0.1)
    adv_seq = randn((B,), g, device, torch.float32)
    mask = torch.ones(B, T, device=device)
    mask[:, T - max(1, T // 10) :] = 0.0  # padded tail
    to = lambda t: t.contiguous()  # noqa: E731
    return {
        "logits_full": logits,
        "targets": to(targets),
        "old_logp": to(old_logp),
        "ref_logp": to(ref_logp),
        "adv_seq": to(adv_seq),
        "advantages": to(adv_seq[:, None].expand(B, T)),
        "mask": to(mask),
    }


def _args(i):
    return i["logits_full"][:, :-1], i["targets"], i["old_logp"], i["advantages"], i["ref_logp"], i["mask"]


def build_liger(i):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    def fn():
        loss, _metrics = triton_grpo_loss(
            i["logits_full"], i["old_logp"], i["ref_logp"], i["targets"], i["adv_seq"], i["mask"],
            temperature=1.0, beta=KL_COEF, eps_low=CLIP, eps_high=CLIP, loss_type="bnpo", reduce=True,
        )  # fmt: skip
        return (loss,)

    return fn


def _ours(backend, overwrite=False):
    def build(i):
        logits, targets, old_logp, adv, ref_logp, mask = _args(i)
        return lambda: (
            rk.ppo_loss(
                logits, targets, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=KL_COEF, clip_low=CLIP,
                clip_high=CLIP, backend=backend, overwrite_logits=overwrite,
            ).loss,
        )  # fmt: skip

    return build


def _probe(backend, device):
    logits = torch.randn(1, 3, 7, device=device)
    z = torch.zeros(1, 3, device=device)
    rk.ppo_loss(logits, torch.tensor([[0, 6, 2]], device=device), z, z + 1, z + 1, backend=backend)


providers = {
    "eager": Provider(lambda i: lambda: eager_ppo(*_args(i))[:1]),
    "compile": Provider(lambda i: (lambda f: lambda: f(*_args(i))[:1])(compiled("ppo", eager_ppo)), compile_reason),
    "chunked": Provider(lambda i: lambda: chunked_ppo(*_args(i))[:1]),
    "liger": Provider(build_liger, liger_reason),
}
for _b in OURS:
    providers[_b] = Provider(_ours(_b), our_reason("ppo_loss", rk.ppo_loss, _b, _probe))


def bytes_moved(case: Case, mode: str) -> float:
    nv = float(case.N) * case.V * case.elem
    reads = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * nv
    writes = nv if mode in ("bwd", "fwd+bwd") else 0.0
    return reads + writes + case.N * 24 * (2 if mode == "fwd+bwd" else 1)


# ppo_loss+overwrite: our GPU backends with overwrite_logits=True: CUDA's fused step writes the gradient over the
# logits, as Liger's GRPO loss does with its default inplace=True; Triton takes its two-pass form, whose backward
# writes over them (its fused kernel cannot: ops/ppo.py), so its row is also that form's time against the fused
# ppo_loss row. The other providers, on which the setting changes nothing, are measured under ppo_loss
overwrite_providers = {name: measured_under("ppo_loss") for name in COMPETITORS + OURS}
for _b in ("cuda", "triton"):
    overwrite_providers[_b] = Provider(_ours(_b, overwrite=True), our_reason("ppo_loss", rk.ppo_loss, _b, _probe))


def _spec(name: str, providers_of: dict, description: str) -> OpSpec:
    return OpSpec(name=name, family="logits", make_inputs=make_inputs, grad_names=("logits_full",),
                  providers=providers_of, bytes_moved=bytes_moved, description=description)  # fmt: skip


OPS = {
    "ppo_loss": _spec("ppo_loss", providers,
                      "PPO clipped loss + k3 KL penalty (token-mean) from logits [B, T+1, V], N = B·T"),
    "ppo_loss+overwrite": _spec("ppo_loss+overwrite", overwrite_providers,
                                "ppo_loss with overwrite_logits=True (the CUDA fused step writes the gradient over the "
                                "logits, Triton's two-pass backward likewise; elsewhere the same as ppo_loss)"),
}
