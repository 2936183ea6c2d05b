"""linear_logprobs (± entropy): ``hidden[N, H]``, LM head ``weight[V, H]``, ``targets[N]`` -> ``logp[N]``.

The fused-linear op is bound by the matmul, not by memory: besides GB/s the
suite reports TFLOP/s (``2·N·V·H`` forward, ``4·N·V·H`` backward) against the
dense matmul throughput measured in the same run. Eager materialises the
``[N, V]`` logits and their float32 log-softmax; the chunked loop does the
matmul and the log-softmax per row chunk. Liger-Kernel's equivalent is its
fused linear cross-entropy with ``reduction="none"`` (``-logp``; no entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import rlhf_kernels as rk

from .providers import (
    CHUNK_ROWS,
    OURS,
    Case,
    OpSpec,
    Provider,
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
    hidden = randn((case.N, case.H), g, device, case.dtype)
    weight = randn((case.V, case.H), g, device, case.dtype, case.H**-0.5)
    targets = randint(case.V, (case.N,), g, device)
    return {"hidden": hidden, "weight": weight, "targets": targets}


def chunked_linear(hidden, weight, targets, entropy, chunk: int = CHUNK_ROWS):
    outs = [
        eager_logprobs(F.linear(hidden[s : s + chunk], weight), targets[s : s + chunk], entropy)
        for s in range(0, hidden.shape[0], chunk)
    ]
    return tuple(torch.cat(parts) for parts in zip(*outs))


def bytes_moved(case: Case, mode: str) -> float:
    operands = (float(case.N) * case.H + float(case.V) * case.H) * case.elem
    return {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode] * operands + case.N * 12


def flops(case: Case, mode: str) -> float:
    return {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * float(case.N) * case.V * case.H


def _spec(entropy: bool) -> OpSpec:
    name = "linear_logprobs+ent" if entropy else "linear_logprobs"

    def eager(hidden, weight, targets):
        return eager_logprobs(F.linear(hidden, weight), targets, entropy)

    def args(i):
        return i["hidden"], i["weight"], i["targets"]

    providers = {
        "eager": Provider(lambda i: lambda: eager(*args(i))),
        "compile": Provider(lambda i: (lambda f: lambda: f(*args(i)))(compiled(name, eager)), compile_reason),
        "chunked": Provider(lambda i: lambda: chunked_linear(*args(i), entropy)),
    }
    if entropy:
        providers["liger"] = no_liger("its fused linear cross-entropy returns no per-token entropy")
    else:

        def build_liger(i):
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return lambda: (liger_fused_linear_cross_entropy(i["hidden"], i["weight"], i["targets"], reduction="none"),)

        providers["liger"] = Provider(build_liger, liger_reason)

    def probe(backend, device):
        rk.linear_logprobs(
            torch.randn(3, 4, device=device), torch.randn(7, 4, device=device), torch.tensor([0, 6, 2], device=device),
            return_entropy=entropy, backend=backend,
        )  # fmt: skip

    def ours(backend):
        def build(i):
            def fn():
                out = rk.linear_logprobs(*args(i), return_entropy=entropy, backend=backend)
                return out if isinstance(out, tuple) else (out,)

            return fn

        return build

    for backend in OURS:
        providers[backend] = Provider(ours(backend), our_reason("linear_logprobs", rk.linear_logprobs, backend, probe))
    return OpSpec(
        name=name,
        family="linear",
        make_inputs=make_inputs,
        grad_names=("hidden", "weight"),
        providers=providers,
        bytes_moved=bytes_moved,
        flops=flops,
        description=("log-prob and entropy" if entropy else "log-prob") + " from hidden [N, H] and LM head [V, H]",
    )


OPS = {"linear_logprobs": _spec(False), "linear_logprobs+ent": _spec(True)}
