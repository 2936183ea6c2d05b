"""kl_divergence: exact per-token ``KL(softmax(z) ‖ softmax(r))`` from ``logits, ref_logits [N, V]``.

The reference logits are frozen (no gradient), as in RLHF. Bytes that must
move: both logit tensors read once per pass, ``dlogits`` written once.
Liger-Kernel's ``kl_div`` takes log-probabilities (not logits) and returns an
element-wise or batch-reduced loss, so it has no per-token logits -> KL op.
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from .providers import (
    CHUNK_ROWS,
    COMPETITORS,
    OURS,
    Case,
    OpSpec,
    Provider,
    compile_reason,
    compiled,
    generator,
    measured_under,
    no_liger,
    our_reason,
    randn,
)


def eager_kl(logits: torch.Tensor, ref_logits: torch.Tensor):
    lp = torch.log_softmax(logits.float(), dim=-1)
    lq = torch.log_softmax(ref_logits.float(), dim=-1)
    return ((lp.exp() * (lp - lq)).sum(-1),)


def chunked_kl(logits: torch.Tensor, ref_logits: torch.Tensor, chunk: int = CHUNK_ROWS):
    out = []
    for start in range(0, logits.shape[0], chunk):
        out.append(eager_kl(logits[start : start + chunk], ref_logits[start : start + chunk])[0])
    return (torch.cat(out),)


def make_inputs(case: Case, device: torch.device, seed: int):
    g = generator(device, seed)
    logits = randn((case.N, case.V), g, device, case.dtype, 2.0)
    ref = randn((case.N, case.V), g, device, case.dtype, 0.3).add_(logits)
    return {"logits": logits, "ref_logits": ref}


def bytes_moved(case: Case, mode: str) -> float:
    nv = float(case.N) * case.V * case.elem
    reads = {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * nv
    writes = nv if mode in ("bwd", "fwd+bwd") else 0.0
    return reads + writes + case.N * 4 * (2 if mode == "fwd+bwd" else 1)


def _probe(backend, device):
    x = torch.randn(3, 7, device=device)
    rk.kl_divergence(x, torch.randn(3, 7, device=device), backend=backend)


def _ours(backend, overwrite=False):
    return lambda i: lambda: (
        rk.kl_divergence(i["logits"], i["ref_logits"], backend=backend, overwrite_logits=overwrite),
    )


providers = {
    "eager": Provider(lambda i: lambda: eager_kl(i["logits"], i["ref_logits"])),
    "compile": Provider(lambda i: (lambda f: lambda: f(i["logits"], i["ref_logits"]))(compiled("kl", eager_kl)), compile_reason),
    "chunked": Provider(lambda i: lambda: chunked_kl(i["logits"], i["ref_logits"])),
    "liger": no_liger("its kl_div takes log-probs and has no per-token KL from logits"),
}
for _b in OURS:
    providers[_b] = Provider(_ours(_b), our_reason("kl_divergence", rk.kl_divergence, _b, _probe))

# kl_divergence+overwrite: our backends with overwrite_logits=True (the backward writes dlogits over the logits: no
# gradient-sized buffer at the peak); the others, on which the setting changes nothing, are measured under kl_divergence
overwrite_providers = {name: measured_under("kl_divergence") for name in COMPETITORS}
for _b in OURS:
    overwrite_providers[_b] = Provider(_ours(_b, overwrite=True), our_reason("kl_divergence", rk.kl_divergence, _b, _probe))


def _spec(name: str, providers_of: dict, description: str) -> OpSpec:
    return OpSpec(name=name, family="logits", make_inputs=make_inputs, grad_names=("logits",),
                  providers=providers_of, bytes_moved=bytes_moved, description=description)  # fmt: skip


OPS = {
    "kl_divergence": _spec("kl_divergence", providers,
                           "exact full-vocabulary KL(p ‖ q) per token from two logit tensors [N, V]"),
    "kl_divergence+overwrite": _spec("kl_divergence+overwrite", overwrite_providers,
                                     "kl_divergence with overwrite_logits=True (the backward writes dlogits over "
                                     "the logits)"),
}
