"""``linear_logprobs``: log-probs and entropy from hidden states and the LM head.

Today this computes ``hidden @ weight.T + bias`` once and feeds the fused
``logprobs`` op (so no float32 log-softmax is materialised, but the logits
are); the chunked path that never materialises the logits is issue #6.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._checks import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_same_shape, check_tensor
from .logprobs import logprobs


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
):
    """``logprobs(hidden @ weight.T + bias, targets, ...)``.

    Shapes: ``hidden[*, H]``, ``weight[V, H]``, ``targets[*]``, ``bias[V]`` ->
    float32 ``logp[*]`` (and ``entropy[*]``). Gradients flow to ``hidden``,
    ``weight`` and ``bias``. ``chunk_size`` is accepted for API stability and
    used by the chunked implementation (issue #6).
    """
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("targets", targets, INDEX_DTYPES)
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden must be [*, H] and weight [V, H] with the same H, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    check_same_shape("targets", targets, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
        check_same_shape("bias", bias, weight.shape[:1], "weight.shape[0]")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    check_same_device("hidden", hidden, weight=weight, targets=targets, bias=bias)
    logits = F.linear(hidden, weight, bias)
    return logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy, backend=backend
    )
