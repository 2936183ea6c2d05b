"""Fused-linear ops from ``hidden[N, H]``, LM head ``weight[V, H]``, ``targets[N]``.

``linear_logprobs`` (± entropy) -> ``logp[N]``; ``linear_cross_entropy`` (SFT,
token mean) and ``linear_ppo_loss`` (PPO, k3 KL, token mean over ``[N/T, T]``
sequences of ``T = 1024``) -> the scalar loss. Ours compute those two losses'
gradient in the forward when one is needed (3 matmuls); the ``+recompute``
variants (``linear_cross_entropy+recompute``, ``linear_ppo_loss+recompute``)
run ours with ``grad_in_forward=False`` (logits recomputed in backward, 4
matmuls) and skip the other providers, which the plain names measure; the
``+vocab`` variants run ours with ``chunk_by="vocab"`` (the gradient in the
forward over vocabulary slabs: no ``[V, H]`` float32 weight-gradient
accumulator, 4 matmuls), for the memory target. ``linear_logprobs`` itself
takes the vocabulary slabs on the GPU when a 16-bit head needs a gradient (its
default, ``logprobs_chunk_by``); ``linear_logprobs+rows`` runs ours with the row chunks
(``chunk_by="rows"``) for comparison. ``linear_logprobs+frozen`` gives only
``hidden`` a gradient (a frozen head, as under LoRA), which ours computes in
the forward (2 matmuls, as the materialised path); its TFLOP/s count those two.

The fused-linear op is bound by the matmul, not by memory: besides GB/s the
suite reports TFLOP/s (``2·N·V·H`` forward, ``4·N·V·H`` backward) against the
dense matmul throughput measured in the same run. Eager materialises the
``[N, V]`` logits and their float32 log-softmax; the chunked loop does the
matmul and the log-softmax per row chunk. Liger-Kernel's equivalent is its
fused linear cross-entropy with ``reduction="none"`` (``-logp``; no entropy),
and with ``reduction="mean"`` for ``linear_cross_entropy``; its fused-linear
GRPO loss is not wired here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

import rlhf_kernels as rk

from .bench_ppo import CLIP, KL_COEF, _ppo_terms
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


def frozen_bytes_moved(case: Case, mode: str) -> float:
    """A frozen head: the backward reads the operands once and writes no weight gradient."""
    operands = (float(case.N) * case.H + float(case.V) * case.H) * case.elem
    return {"fwd": 1, "bwd": 1, "fwd+bwd": 2}[mode] * operands + case.N * 12


def frozen_flops(case: Case, mode: str) -> float:
    """A frozen head: the logits, then ``dX`` only (the matmuls the materialised path must do)."""
    return {"fwd": 2, "bwd": 2, "fwd+bwd": 4}[mode] * float(case.N) * case.V * case.H


def _spec(entropy: bool, rows: bool = False, frozen: bool = False) -> OpSpec:
    """``linear_logprobs`` (``+ent``: with the entropy); ``rows``: ours alone with ``chunk_by="rows"`` (row chunks
    and a ``[V, H]`` float32 weight-gradient accumulator for a 16-bit head, where the default takes vocabulary
    slabs), the others measured under the plain name; ``frozen``: every provider with a head that needs no
    gradient (LoRA), so only ``hidden`` gets one (ours: the gradient direction computed in the forward)."""
    base = "linear_logprobs+ent" if entropy else "linear_logprobs"
    name = base + ("+rows" if rows else "") + ("+frozen" if frozen else "")
    options = dict(chunk_by="rows") if rows else {}

    def eager(hidden, weight, targets):
        return eager_logprobs(F.linear(hidden, weight), targets, entropy)

    def args(i):
        return i["hidden"], i["weight"], i["targets"]

    providers = {
        "eager": Provider(lambda i: lambda: eager(*args(i))),
        "compile": Provider(lambda i: (lambda f: lambda: f(*args(i)))(compiled(name, eager)), compile_reason),
        "chunked": Provider(lambda i: lambda: chunked_linear(*args(i), entropy)),
    }
    if rows:
        providers = {p: _skipped(base) for p in ("eager", "compile", "chunked", "liger")}
    elif entropy:
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
                out = rk.linear_logprobs(*args(i), return_entropy=entropy, backend=backend, **options)
                return out if isinstance(out, tuple) else (out,)

            return fn

        return build

    for backend in OURS:
        providers[backend] = Provider(ours(backend), our_reason("linear_logprobs", rk.linear_logprobs, backend, probe))
    return OpSpec(
        name=name,
        family="linear",
        make_inputs=make_inputs,
        grad_names=("hidden",) if frozen else ("hidden", "weight"),
        providers=providers,
        bytes_moved=frozen_bytes_moved if frozen else bytes_moved,
        flops=frozen_flops if frozen else flops,
        description=("log-prob and entropy" if entropy else "log-prob") + " from hidden [N, H] and LM head [V, H]"
        + (" (ours: row chunks, chunk_by='rows')" if rows else "")
        + (", the head frozen (gradient to hidden only)" if frozen else ""),
    )


PPO_T = 1024  # tokens per sequence of linear_ppo_loss (N = B·T when N is a multiple, else one sequence)


def _skipped(name: str) -> Provider:
    return Provider(build=lambda inputs: None, reason=lambda case, device: f"measured under {name}")


def make_ppo_inputs(case: Case, device: torch.device, seed: int):
    i = make_inputs(case, device, seed)
    g = generator(device, seed + 1)
    T = PPO_T if case.N % PPO_T == 0 else case.N
    B = case.N // T
    with torch.no_grad():  # near-on-policy old / ref log-probs, no [N, V] float32 temporary
        (logp,) = chunked_linear(i["hidden"], i["weight"], i["targets"], False)
    shape = (B, T)
    mask = torch.ones(shape, device=device)
    mask[:, T - max(1, T // 10) :] = 0.0  # padded tail
    adv_seq = randn((B, 1), g, device, torch.float32)
    i.update(
        targets=i["targets"].reshape(shape),
        old_logp=(logp + randn((case.N,), g, device, torch.float32, 0.1)).reshape(shape),
        ref_logp=(logp + randn((case.N,), g, device, torch.float32, 0.1)).reshape(shape),
        advantages=adv_seq.expand(shape).contiguous(),
        mask=mask,
    )
    return i


# Variants of ours for the linear losses: the default (gradient in the forward, row chunks), "recompute"
# (grad_in_forward=False: logits recomputed in backward) and "vocab" (gradient in the forward over vocabulary
# slabs, chunk_by="vocab": no [V, H] float32 accumulator, 4 matmuls).
_LOSS_VARIANTS = {
    "": (dict(), " (ours: gradient computed in the forward)"),
    "recompute": (dict(grad_in_forward=False), " (ours: logits recomputed in backward)"),
    "vocab": (dict(chunk_by="vocab"), " (ours: gradient in the forward over vocabulary slabs)"),
}


def _loss_spec(kind: str, variant: str) -> OpSpec:
    """``kind``: ``"ce"`` (linear_cross_entropy) or ``"ppo"`` (linear_ppo_loss); ``variant``: in ``_LOSS_VARIANTS``."""
    op = "linear_cross_entropy" if kind == "ce" else "linear_ppo_loss"
    name = op + (f"+{variant}" if variant else "")
    options, what_ours = _LOSS_VARIANTS[variant]

    def eager(hidden, weight, targets, *ppo):
        if kind == "ce":
            return F.cross_entropy(F.linear(hidden, weight).float(), targets)
        B, T = targets.shape
        (logp,) = eager_logprobs(F.linear(hidden, weight), targets.reshape(-1), False)
        return _ppo_terms(logp.reshape(B, T), *ppo)

    def chunked(hidden, weight, targets, *ppo):
        if kind == "ce":
            (logp,) = chunked_linear(hidden, weight, targets, False)
            return -logp.mean()
        (logp,) = chunked_linear(hidden, weight, targets.reshape(-1), False)
        return _ppo_terms(logp.reshape(targets.shape), *ppo)

    def args(i):
        if kind == "ce":
            return i["hidden"], i["weight"], i["targets"]
        return i["hidden"], i["weight"], i["targets"], i["old_logp"], i["advantages"], i["ref_logp"], i["mask"]

    def ours(backend):
        def build(i):
            def fn():
                if kind == "ce":
                    return (rk.linear_cross_entropy(*args(i), backend=backend, **options),)
                hidden = i["hidden"].reshape(*i["targets"].shape, -1)
                out = rk.linear_ppo_loss(
                    hidden, i["weight"], i["targets"], i["old_logp"], i["advantages"], i["mask"],
                    ref_logp=i["ref_logp"], kl_coef=KL_COEF, clip_low=CLIP, clip_high=CLIP, backend=backend, **options,
                )  # fmt: skip
                return (out.loss,)

            return fn

        return build

    def probe(backend, device):
        h, w, t = torch.randn(1, 3, 4, device=device), torch.randn(7, 4, device=device), torch.tensor([[0, 6, 2]])
        if kind == "ce":
            rk.linear_cross_entropy(h, w, t.to(device), backend=backend)
        else:
            z = torch.zeros(1, 3, device=device)
            rk.linear_ppo_loss(h, w, t.to(device), z, z + 1, z + 1, backend=backend)

    if variant:
        providers = {p: _skipped(op) for p in ("eager", "compile", "chunked", "liger")}
    else:
        providers = {
            "eager": Provider(lambda i: lambda: (eager(*args(i)),)),
            "compile": Provider(lambda i: (lambda f: lambda: (f(*args(i)),))(compiled(name, eager)), compile_reason),
            "chunked": Provider(lambda i: lambda: (chunked(*args(i)),)),
        }
        if kind == "ce":

            def build_liger(i):
                from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

                return lambda: (liger_fused_linear_cross_entropy(i["hidden"], i["weight"], i["targets"]),)

            providers["liger"] = Provider(build_liger, liger_reason)
        else:
            providers["liger"] = no_liger("its fused-linear GRPO loss is not wired into this suite")
    fn = rk.linear_cross_entropy if kind == "ce" else rk.linear_ppo_loss
    for backend in OURS:
        providers[backend] = Provider(ours(backend), our_reason(name, fn, backend, probe))
    what = "SFT cross-entropy (token mean)" if kind == "ce" else "PPO loss (k3 KL, token mean)"
    return OpSpec(
        name=name,
        family="linear",
        make_inputs=make_inputs if kind == "ce" else make_ppo_inputs,
        grad_names=("hidden", "weight"),
        providers=providers,
        bytes_moved=bytes_moved,
        flops=flops,
        description=what + " from hidden [N, H] and LM head [V, H]" + what_ours,
    )


def _liger_fp32_reason(case: Case, device: torch.device) -> Optional[str]:
    why = liger_reason(case, device)
    if why is not None:
        return why
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if "accum_dtype" not in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        return "this Liger-Kernel's fused linear cross-entropy has no accum_dtype"
    return None


def _liger_fp32_spec(base: OpSpec) -> OpSpec:
    """Liger-Kernel's fused linear cross-entropy with ``accum_dtype=torch.float32``: its weight gradient accumulated
    in float32 across chunks, as ours is. The plain ``linear_cross_entropy`` rows measure Liger's default
    (``accum_dtype=None``: the parameter's dtype, bf16 for a bf16 head), which needs no ``[V, H]`` float32 buffer,
    and so less memory than any float32-accumulating row-chunk loop (benchmarks/results/nvidia-h200/NOTES.md)."""

    def build(i):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda: (
            liger_fused_linear_cross_entropy(i["hidden"], i["weight"], i["targets"], accum_dtype=torch.float32),
        )

    providers = {p: _skipped(base.name) for p in ("eager", "compile", "chunked") + tuple(OURS)}
    providers["liger"] = Provider(build, _liger_fp32_reason)
    return dataclasses.replace(
        base, name=base.name + "+liger-fp32acc", providers=providers,
        description="SFT cross-entropy (token mean) from hidden [N, H] and LM head [V, H]: Liger-Kernel with "
                    "accum_dtype=float32 (its weight gradient accumulated in float32, as ours)",
    )


OPS = {"linear_logprobs": _spec(False), "linear_logprobs+ent": _spec(True), "linear_logprobs+rows": _spec(False, True),
       "linear_logprobs+frozen": _spec(False, frozen=True)}
for _kind in ("ce", "ppo"):
    for _variant in _LOSS_VARIANTS:
        _s = _loss_spec(_kind, _variant)
        OPS[_s.name] = _s
_s = _liger_fp32_spec(OPS["linear_cross_entropy"])
OPS[_s.name] = _s
