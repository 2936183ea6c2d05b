"""logprobs (± entropy): ``logits[N, V]``, ``targets[N]`` -> ``logp[N]`` (, ``entropy[N]``).

Bytes that must move: the logits are read once per pass (forward; backward)
and the gradient is written once; the per-token vectors are counted too.
Liger-Kernel's equivalent is its cross-entropy with ``reduction="none"``
(``-logp``; it has no entropy output, so it is skipped for ``+entropy``).
Note: Liger writes the gradient into the logits' storage during the forward
when the logits require grad; that is how users run it, so it is measured so.
"""

from __future__ import annotations

import torch

import rlhf_kernels as rk

from .providers import (
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
    no_liger,
    our_reason,
    randint,
    randn,
)


def make_inputs(case: Case, device: torch.device, seed: int):
    g = generator(device, seed)
    logits = randn((case.N, case.V), g, device, case.dtype, 2.0)
    targets = randint(case.V, (case.N,), g, device)
    return {"logits": logits, "targets": targets}


def bytes_moved(case: Case, mode: str, n_logit_inputs: int = 1, n_outputs: int = 1) -> float:
    nv = float(case.N) * case.V * case.elem
    per_token = case.N * (8 + 4 * n_outputs)  # targets + float32 outputs (or their grads)
    reads = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * n_logit_inputs * nv
    writes = nv if mode in ("bwd", "fwd+bwd") else 0.0
    return reads + writes + per_token * (2 if mode == "fwd+bwd" else 1)


def _probe(entropy):
    def probe(backend, device):
        logits = torch.randn(3, 7, device=device)
        rk.logprobs(logits, torch.tensor([0, 6, 2], device=device), return_entropy=entropy, backend=backend)

    return probe


def _spec(entropy: bool) -> OpSpec:
    name = "logprobs+ent" if entropy else "logprobs"
    eager = lambda logits, targets: eager_logprobs(logits, targets, entropy)  # noqa: E731
    providers = {
        "eager": Provider(lambda i: lambda: eager(i["logits"], i["targets"])),
        "compile": Provider(
            lambda i: (lambda f: lambda: f(i["logits"], i["targets"]))(compiled(name, eager)), compile_reason
        ),
        "chunked": Provider(lambda i: lambda: chunked_logprobs(i["logits"], i["targets"], entropy)),
    }
    if entropy:
        providers["liger"] = no_liger("its cross-entropy returns no per-token entropy")
    else:

        def build_liger(i):
            from liger_kernel.transformers.functional import liger_cross_entropy

            return lambda: (liger_cross_entropy(i["logits"], i["targets"], reduction="none"),)

        providers["liger"] = Provider(build_liger, liger_reason)
    for backend in OURS:
        providers[backend] = Provider(
            (lambda b: lambda i: lambda: _as_tuple(rk.logprobs(i["logits"], i["targets"], return_entropy=entropy, backend=b)))(
                backend
            ),
            our_reason("logprobs", rk.logprobs, backend, _probe(entropy)),
        )
    n_out = 2 if entropy else 1
    return OpSpec(
        name=name,
        family="logits",
        make_inputs=make_inputs,
        grad_names=("logits",),
        providers=providers,
        bytes_moved=lambda case, mode: bytes_moved(case, mode, 1, n_out),
        description=("log-prob of the target and entropy" if entropy else "log-prob of the target") + " from logits [N, V]",
    )


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


OPS = {"logprobs": _spec(False), "logprobs+ent": _spec(True)}
