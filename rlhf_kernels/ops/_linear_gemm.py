"""The fused-linear ops' GEMMs, each run over a vocabulary extent that is a whole number of 16-byte vectors.

A chunk's logits ``[c, V]`` and ``dlogits`` are contiguous along the vocabulary,
and each of the three GEMMs that touch them has ``V`` as one extent:

    logits = hidden_c @ weight.T (+ bias)   V output columns       (``logits_gemm``)
    dX    (+)= dlogits @ weight             V summed over          (``grad_hidden_gemm``)
    dW    (+)= dlogits.T @ hidden_c         V output rows          (``grad_weight_gemm``)

cuBLAS picks its kernels by each matrix's alignment, the extent along the
contiguous dimension included, not only the pointer and the leading dimension.
At GPT-2's V = 50257 (odd) every provider's logits GEMM ran at ~100 TFLOP/s on
the H200 (run 6: ``linear_logprobs`` forward, 4096 x 50257 x 2048 bf16,
8.3 ms for a 1.1 ms matmul), ours too although ``_row_buffer`` already gave its
rows a 16-byte aligned leading dimension, while the same run's vocabulary slabs
(multiples of 256 columns but the last) ran the backward's four GEMMs at about
490-570 TFLOP/s (6.9 ms fwd+bwd at H = 2048). So on ``SPLIT_DEVICES``
each GEMM whose vocabulary extent is not a multiple of ``16 / itemsize`` runs
as two: the aligned bulk ``[0, b)`` and the tail ``[b, V)`` of fewer than 8
columns (a GEMM that costs one read of the ``[c, H]`` operand).

Results: the logits and the weight gradient split their output, so every
element is still one GEMM's sum. The hidden states' gradient splits its sum: the
tail's product is written first and the bulk's GEMM adds it (``beta = 1``), so
in a 16-bit ``grad_hidden`` the tail's share is rounded once more (at most half
an ulp of that share, a few columns of the vocabulary). The CPU's GEMMs handle
tails themselves (``benchmarks/results/cpu-linear``: the row path at 1.1x the
materialised time at V = 50257), so it keeps one GEMM and its bits.
"""

from __future__ import annotations

from typing import Optional

import torch

# Devices whose GEMMs are split at the last whole 16-byte vector of the vocabulary extent. Tests widen it.
SPLIT_DEVICES = ("cuda",)
_VECTOR_BYTES = 16


def vocab_parts(v: int, like: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """``((0, b), (b, v))``, the aligned bulk and the tail of a vocabulary extent ``v`` on ``SPLIT_DEVICES``
    (``b`` = ``v`` rounded down to a multiple of ``16 / itemsize`` of ``like``'s dtype), or ``((0, v),)`` when
    ``v`` is aligned already, shorter than one vector, or ``like`` lives elsewhere."""
    per_vector = max(1, _VECTOR_BYTES // like.element_size())
    bulk = v - v % per_vector
    if like.device.type not in SPLIT_DEVICES or bulk in (0, v):
        return ((0, v),)
    return ((0, bulk), (bulk, v))


def accumulate_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out (+)= a @ b`` in ``out``'s dtype whatever the operands' dtype: a 16-bit product written or added
    straight into a float32 (float64) buffer, or a same-dtype GEMM.

    ``first``: ``out`` is uninitialised and gets the product (the GEMM then
    neither reads it nor needs it zeroed: for the weight gradient at V = 128256,
    H = 4096 that is two 2.1 GB passes saved).
    """
    if a.dtype != out.dtype:
        if a.is_cuda:
            # bf16 / fp16 tensor-core GEMM writing / accumulating straight into the fp32 buffer (no fp32 copies).
            try:
                if first:
                    torch.ops.aten.mm.dtype_out(a, b, out.dtype, out=out)
                else:
                    torch.ops.aten.addmm.dtype_out(out, a, b, out.dtype, out=out)
                return
            except (AttributeError, RuntimeError, NotImplementedError):  # torch without the mixed-dtype GEMMs
                pass
        # CPU (no mixed-dtype GEMM): one chunk-sized upcast of each operand.
        a, b = a.to(out.dtype), b.to(out.dtype)
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def logits_gemm(hidden_c: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                out: torch.Tensor) -> None:
    """``out[c, V] = hidden_c[c, H] @ weight[V, H].T (+ bias[V])``, each part of ``vocab_parts`` one GEMM into
    its columns of ``out`` (unit stride along ``V``). With a bias, one rounding per element as ``F.linear``: the
    bias joins the GEMM's float32 accumulation (``beta = 1``)."""
    for s, e in vocab_parts(weight.shape[0], out):
        if bias is None:
            torch.mm(hidden_c, weight[s:e].t(), out=out[:, s:e])
        else:
            torch.addmm(bias[s:e], hidden_c, weight[s:e].t(), out=out[:, s:e])


def grad_hidden_gemm(out: torch.Tensor, dlogits: torch.Tensor, weight: torch.Tensor, first: bool) -> None:
    """``out[c, H] (+)= dlogits[c, V] @ weight[V, H]`` (``accumulate_mm``; ``first``: ``out`` uninitialised). Split
    by ``vocab_parts``, the tail's product goes in first and the aligned bulk's GEMM adds it, so the last
    rounding is that of the large GEMM."""
    for i, (s, e) in enumerate(reversed(vocab_parts(weight.shape[0], dlogits))):
        accumulate_mm(out, dlogits[:, s:e], weight[s:e], first and i == 0)


def grad_weight_gemm(out: torch.Tensor, dlogits: torch.Tensor, hidden_c: torch.Tensor, first: bool) -> None:
    """``out[V, H] (+)= dlogits[c, V].T @ hidden_c[c, H]`` (``accumulate_mm``; ``first``: ``out``
    uninitialised), split by ``vocab_parts`` into row blocks of ``out``: every element one GEMM's sum as before."""
    for s, e in vocab_parts(out.shape[0], dlogits):
        accumulate_mm(out[s:e], dlogits[:, s:e].t(), hidden_c, first)
