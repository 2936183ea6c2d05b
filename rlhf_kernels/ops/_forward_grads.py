"""Gradients computed in the forward, handed to autograd by the backward without a copy.

The fused losses (``ppo_loss``'s CUDA and Triton forward-with-gradient, ``linear_cross_entropy`` and
``linear_ppo_loss``) know their upstream gradient inside the forward (``loss = Σ w·term``, the weights
depend on the mask alone), so the forward writes ``∂loss/∂input`` for an upstream gradient of 1 and the
backward only multiplies by the scalar ``g`` it receives.

Why not ``ctx.save_for_backward``: a saved tensor stays referenced by the graph while
``AccumulateGrad`` runs, and ``AccumulateGrad`` adopts a gradient as ``.grad`` only when nothing else
references it; otherwise it copies it. That copy is a second gradient-sized buffer and one more read and
write of it: on an H200 at bf16 [8192, 151936] logits, 2.4 GB and about 1.2 ms per step
(benchmarks/results/nvidia-h200/NOTES.md). So the forward's gradients are kept as a plain ``ctx``
attribute (they are outputs marked non-differentiable, so this makes no reference cycle) and the
backward takes them off ``ctx`` before returning them: the autograd engine then holds the only reference.

The price: the backward runs once (``retain_graph=True`` and a second backward raise). That is done on
the devices in ``HAND_OVER_DEVICES`` (CUDA), where the gradients are gigabytes and a copy is a full pass
over memory. On the CPU the kept gradients stay on ``ctx`` and are returned as they are (upstream
gradient 1) or scaled into a new tensor, so a retained graph's backward, and ``gradcheck``'s repeated
backward, can run again; ``AccumulateGrad`` copies them there. While a graph is traced
(``torch.compile``) the backward returns ``g·grad`` out of place, as a traced backward may not mutate a
forward output.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._dispatch import triton_importable

_ATTR = "forward_grads"
# Devices whose backward hands the kept gradients over (once) instead of keeping them for another backward.
HAND_OVER_DEVICES = ("cuda",)


def traced(t: torch.Tensor) -> bool:
    """True while AOTAutograd / torch.compile traces (fake or functional tensors), False in eager.

    ``FunctionalTensor`` is tested by type: torch 2.6's ``is_fake`` says False for
    one that wraps a fake tensor (AOTAutograd's traced backward, ``opcheck``'s
    ``test_aot_dispatch_dynamic``), and the eager branch's ``.item()`` then fails
    on a symbolic value."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or isinstance(t, FunctionalTensor) or is_fake(t)


def scale_grad_unless_one(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """``grad *= scale`` in place; on CUDA a no-op with no memory traffic when ``scale == 1`` (read on the device).

    Called by eager backwards only (a traced one scales out of place), which bump the version counter themselves.
    A plain function: as a registered op its Python dispatch cost 11 µs per call on the CI CPU, host time of every
    fused step."""
    from .. import _ext

    if grad.is_cuda and grad.dtype != torch.float64 and _ext.cuda_kernels_run_on(grad.device):
        torch.ops.rlhf_kernels_C.scale_unless_one_.default(grad, scale)
    elif grad.is_cuda and grad.is_contiguous() and triton_importable():  # (a Triton-only install)
        from ..triton.scale import scale_unless_one_

        scale_unless_one_(grad, scale)
    elif grad.is_cuda:
        grad.mul_(scale.to(grad.dtype))  # no kernel of ours: one pass, no host sync
    elif scale.item() != 1.0:  # on the CPU reading the scale costs nothing
        grad.mul_(scale.to(grad.dtype))


def keep(ctx, grads: Sequence[Optional[torch.Tensor]]) -> None:
    """In ``setup_context``: keep the forward's gradients (``None`` for an input that needs none) for ``hand_over``.

    Also turns off autograd's zero-filling of the upstream gradients of outputs that get none (the statistics and
    the gradient outputs themselves): by default the backward is handed ``zeros_like`` of each, which for
    ``dlogits`` or a ``[V, H]`` weight gradient is one more gradient-sized buffer and a full write of it per step
    (on an H200, bf16 [8192, 151936] logits: 2.4 GB and about 0.8 ms; benchmarks/results/nvidia-h200, run 3).
    """
    ctx.set_materialize_grads(False)
    setattr(ctx, _ATTR, tuple(grads))


def hand_over(ctx, g_out: torch.Tensor, op: str) -> tuple[Optional[torch.Tensor], ...]:
    """In the backward: the kept gradients times the upstream scalar ``g_out``.

    Eager, on a ``HAND_OVER_DEVICES`` device: scaled in place (``scale_grad_unless_one``), released from
    ``ctx`` and returned as the only reference, so ``AccumulateGrad`` adopts them as ``.grad``; a second
    call raises, naming ``op``. Elsewhere they stay kept for another backward (module docstring).
    """
    grads = getattr(ctx, _ATTR, None)
    if grads is None:
        raise RuntimeError(
            f"{op}: its backward already ran. The gradient is computed in the forward and handed over by the "
            "first backward, so the backward runs once (retain_graph=True cannot replay it); call the op again "
            "for another backward."
        )
    if g_out is None:  # no upstream gradient reached the loss (materialising is off, see keep): none flows on
        setattr(ctx, _ATTR, None)
        return tuple(None for _ in grads)
    g = g_out.detach().reshape(())
    live = [t for t in grads if t is not None]
    tracing = bool(live) and traced(live[0])
    if tracing or (live and live[0].device.type not in HAND_OVER_DEVICES):  # kept: new tensors, or the kept ones
        if not tracing and g.item() == 1.0:
            return grads
        return tuple(None if t is None else t * g.to(t.dtype) for t in grads)
    setattr(ctx, _ATTR, None)
    for t in live:  # (a kernel writing through a pointer: autograd learns of it from the version bump)
        scale_grad_unless_one(t, g)
        torch.autograd.graph.increment_version(t)
    return grads
