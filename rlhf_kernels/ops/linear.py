"""Fused-linear ops: log-probs, entropy, the PPO loss and the SFT loss from hidden states and the LM head.

``linear_logprobs(hidden, weight, targets, bias)`` equals
``logprobs(hidden @ weight.T + bias, targets)`` but never materialises the
``[N, V]`` logits. Rows are processed ``chunk_size`` at a time:

    forward   logits_c = hidden_c @ weight.T (+ bias)       [c, V], input dtype
              (logp, entropy, lse)_c = logprobs kernel(logits_c)
    backward  logits_c recomputed, dlogits_c = logprobs backward kernel(...)
              grad_hidden_c  = dlogits_c @ weight
              grad_weight   += dlogits_c.T @ hidden_c        (fp32 accumulator)
              grad_bias     += dlogits_c.sum(0)              (fp32 accumulator)

Only ``hidden, weight, bias, targets, lse, entropy`` are saved (``O(N)``
beyond the inputs), so a training step holds one chunk of logits at a time
(the C++ CPU and Triton backward kernels overwrite the chunk's logits with its
``dlogits`` in place), and a no-grad call (reference / old-policy log-probs)
one chunk. When ``V`` is not a multiple of 8 (GPT-2's 50257) the chunk lives in
a buffer whose rows are padded to 64 elements, so that every GEMM sees 16-byte
aligned leading dimensions, and on a GPU each GEMM runs as an aligned bulk and
a tail of fewer than 8 columns (cuBLAS falls back to far slower kernels for an
unaligned leading dimension or extent). The per-chunk reduction is the backend's fused ``logprobs`` kernel
(C++ CPU, Triton, or the PyTorch reference), called directly, so the loop has
no host synchronisation (targets are validated once, after the loop is queued).

Code: this file holds ``linear_logprobs``'s custom ops and the public functions;
``_linear_common.py`` the chunk sizes, buffers and per-chunk kernels;
``_linear_gemm.py`` the GEMMs;
``_linear_layout.py`` the ``chunk_by`` choice; ``_linear_slabs.py`` the
vocabulary slabs; ``_linear_fused.py`` the losses' forward with the gradient.

Registered as the custom ops ``rlhf_kernels::linear_logprobs_fwd`` /
``linear_logprobs_bwd`` (fake impls + autograd) so ``torch.compile`` traces
them without graph breaks and ``torch.library.opcheck`` passes.

Forward that also produces the gradient (``linear_cross_entropy`` and
``linear_ppo_loss``). These losses are ``loss = Σ_i w_i·term_i`` with per-token
weights ``w`` that depend only on the mask, ``loss_agg`` and ``ignore_index``
(``aggregation_weights``: ``token-mean`` ``m/Σm``, ``seq-mean-*`` per sequence;
cross-entropy ``mean`` ``valid/count``, ``sum`` ``valid``), and each ``term_i``
depends on the logits only through ``(logp_i, entropy_i)``:

    cross-entropy  term = -logp                  ∂term/∂logp = -1, ∂term/∂H = 0
    PPO            term = pg + kl_coef·k - entropy_coef·entropy
                   ∂term/∂logp = _torch_dterm_dlogp(...), ∂term/∂H = -entropy_coef

So the upstream gradient of each token's ``(logp, entropy)``,
``g_logp = w·∂term/∂logp`` and ``g_ent = w·∂term/∂H``, is known as soon as the
chunk's log-probs are, and the forward (``rlhf_kernels::linear_loss_fused``)
finishes each chunk there and then:

    logits_c  = hidden_c @ weight.T (+ bias)                      matmul 1
    (logp, entropy, lse)_c = logprobs kernel(logits_c)
    dlogits_c = logprobs backward kernel(g_logp_c, g_ent_c, ...)
    grad_hidden_c  = dlogits_c @ weight                           matmul 2
    grad_weight   += dlogits_c.T @ hidden_c   (fp32 accumulator)  matmul 3
    grad_bias     += dlogits_c.sum(0)         (fp32 accumulator)

It keeps ``grad_hidden [N, H]``, ``grad_weight [V, H]``, ``grad_bias [V]``
(input dtypes) instead of the inputs, and the backward only multiplies them by
the scalar upstream gradient in place (nothing at all when it is 1, as in
``loss.backward()``: on CUDA a kernel skips the write after reading the scale on
the device) and hands them to autograd as the gradients themselves, not copies
(``ops/_forward_grads.py``: a saved tensor would make ``AccumulateGrad`` copy
``grad_weight``, 1 GB more at V = 128256, H = 4096 bf16). Three matmuls per
step, as in the materialised path, against four for the recompute path. Like
the CUDA ``ppo_loss`` fused path, the backward runs once (``retain_graph=True``
then a second backward raises).

The weights come from ``aggregation_weights`` in float32 (as in the CUDA
``ppo_loss`` fused path), so float64 inputs would get gradients exact to ~1e-7
relative only.

Vocabulary slabs (``chunk_by="vocab"``, or ``RLHF_KERNELS_LINEAR_CHUNK_BY=vocab``):
the same values and gradients, for ``linear_logprobs`` and the losses alike,
but the weight gradient comes from slabs of vocabulary columns over all rows
(``_slab_forward``, ``_slab_gradients``). A slab's weight gradient is then one GEMM
over every token (float32 accumulation inside it, cast once) written into its
rows of ``grad_weight``: no ``[V, H]`` float32 accumulator (2.1 GB for a
128256 x 4096 bf16 head), at the cost of a second logits GEMM (4 matmuls).
``linear_logprobs`` walks slabs in both passes, so ``grad_hidden`` gets an
``[N, H]`` float32 accumulator instead; the losses (``_vocab_slab_loss``) first
sweep row chunks for the log-probs and ``grad_hidden`` (one GEMM over all of
``V`` per chunk), then the slabs for ``grad_weight``, with no accumulator at all. The default,
``chunk_by="auto"``, takes the row chunks unless that accumulator would not fit
in the GPU's free memory, and then the slabs, with a one-time warning.

Frozen head (``linear_logprobs_frozen_head``): when only ``hidden`` needs a
gradient (LoRA, a frozen LM head) and the entropy is not asked for, the log-prob's
gradient is ``g·(weight[y] - Σ_v p_v·weight_v) / T`` per row, a direction times
the upstream gradient, so the forward computes that direction per chunk (logits,
then ``dlogits @ weight``) and the backward only scales it: 2 matmuls, as the
materialised path, where recomputing takes 3.

Which path runs: the forward-with-gradient path when grad mode is on,
``hidden``, ``weight`` or ``bias`` requires grad, and none of them is float64,
unless ``grad_in_forward=False`` or ``RLHF_KERNELS_LINEAR_GRAD=recompute``;
``grad_in_forward=True`` / ``RLHF_KERNELS_LINEAR_GRAD=forward`` force it
whenever a gradient is needed (float64 included). No-grad calls, ``linear_logprobs`` (whose
upstream gradient is only known in backward) and
``linear_cross_entropy(reduction="none")`` always take the recompute path.
"""


from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ..reference import PPOLossOutput
from ._checks import check_choice, check_positive
from ._linear_common import (
    autocast_linear,
    IMPLEMENTED,
    _acc_dtype,
    _accumulator,
    _apply_chunk_grad,
    _check_linear_args,
    _chunk,
    _chunk_buffers,
    _chunk_logits,
    _grad_buffer,
    _in_param_dtypes,
    _kernel_bwd,
    _kernel_fwd,
    _promoted,
    _row_buffer,
    _stats_dtype,
)
# re-exported for tests and tools
from ._linear_common import auto_chunk_size, chunk_rows, float32_gemm_reduction, slab_columns  # noqa: F401
from ._linear_fused import _fused_loss, _grad_in_forward
from ._linear_fused import LINEAR_GRAD_PATHS, linear_grad_path, linear_loss_fused  # noqa: F401 (re-exported)
from ._linear_gemm import grad_hidden_gemm
from ._linear_layout import linear_chunk_by, logprobs_chunk_by
from ._linear_layout import AUTO_CHUNK_DEVICES, LINEAR_CHUNK_BY  # noqa: F401 (re-exported)
from ._linear_slabs import _slab_forward, _slab_gradients
from .logprobs import _validate_targets, resolve_for
from .ppo import check_ppo_args, composed_ppo_terms, ppo_output

__all__ = ["linear_cross_entropy", "linear_logprobs", "linear_ppo_loss"]


@torch.library.custom_op("rlhf_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    chunk_by: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden[N, H]``, ``weight[V, H]``, ``targets[N]`` int64, ``bias[V]`` -> ``(logp, entropy, lse)`` ``[N]``.

    ``chunk_size`` 0 picks the chunk automatically. Outputs are float32
    (float64 for float64 inputs). One chunk of logits exists at a time: rows of
    it, or with ``chunk_by="vocab"`` a slab of columns over all rows
    (``_slab_forward``).
    """
    _validate_targets(targets, weight.shape[0], ignore_index, "linear_logprobs")  # before the chunks (_validate_targets)
    passes = _slab_forward if chunk_by == "vocab" else _row_forward
    logp, entropy, lse = passes(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend)
    return logp, entropy, lse


def _row_forward(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend):
    """``(logp, entropy, lse)`` ``[N]`` from one row chunk of logits at a time (``_slab_forward``'s row twin)."""
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = _stats_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=dtype)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size)
    buffer = _row_buffer(c, v, hidden)
    for s in range(0, n, c):
        e = min(n, s + c)
        logits = _chunk_logits(hidden[s:e], weight, bias, buffer)
        out = _kernel_fwd(logits, targets[s:e], temperature, ignore_index, backend)
        del logits
        for dst, src in zip((logp, entropy, lse), out):
            dst[s:e].copy_(src)
    return logp, entropy, lse


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend, chunk_by="rows"):
    dtype = _stats_dtype(hidden.dtype)
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=dtype) for _ in range(3))


@torch.library.custom_op("rlhf_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    chunk_by: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_hidden[N, H], grad_weight[V, H], grad_bias[V])`` in the inputs' dtype, recomputing the logits per chunk.

    A gradient that is not needed comes back as an empty ``[0]`` tensor and is
    not computed. ``grad_weight`` / ``grad_bias`` are accumulated in float32
    (float64 for float64 inputs) across chunks, then cast. ``chunk_by="vocab"``:
    over vocabulary slabs instead (``_slab_gradients``: each slab's weight
    gradient one GEMM over all tokens, ``grad_hidden`` accumulated in float32).
    """
    stats = lse.dtype
    passes = _slab_gradients if chunk_by == "vocab" else _row_gradients
    grad_hidden, grad_weight, grad_bias = passes(
        grad_logp.to(stats), grad_entropy.to(stats), hidden, weight, targets, bias, lse, entropy, temperature,
        ignore_index, chunk_size, backend, need_hidden, need_weight, need_bias,
    )
    return (grad_hidden,) + _in_param_dtypes(grad_weight, grad_bias, weight, bias, need_weight, need_bias)


def _row_gradients(g_logp, g_ent, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index,
                   chunk_size, backend, need_hidden, need_weight, need_bias):
    """``(grad_hidden, grad_weight, grad_bias)`` of ``Σ g_logp·logp + g_ent·H`` from each row chunk's logits
    computed again (``_slab_gradients``'s row twin); the weight and bias gradients still in float32 (float64)."""
    n, h = hidden.shape
    v = weight.shape[0]
    acc = _acc_dtype(weight.dtype)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    grad_weight = _accumulator(n, weight, acc) if need_weight else weight.new_empty(0)
    grad_bias = torch.zeros((v,), dtype=acc, device=weight.device) if need_bias else weight.new_empty(0)
    if need_hidden or need_weight or need_bias:
        c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, need_weight and acc != weight.dtype,
                   _chunk_buffers(backend))
        buffer = _row_buffer(c, v, hidden)
        spare = _row_buffer(c, v, hidden) if _chunk_buffers(backend) == 2 else None
        for s in range(0, n, c):
            e = min(n, s + c)
            hidden_c = hidden[s:e]
            logits = _chunk_logits(hidden_c, weight, bias, buffer)
            dlogits = _kernel_bwd(
                g_logp[s:e], g_ent[s:e], logits, targets[s:e], lse[s:e], entropy[s:e], temperature, ignore_index,
                backend, _grad_buffer(logits, backend, spare),
            )
            del logits
            _apply_chunk_grad(
                dlogits, weight, hidden_c, grad_hidden[s:e] if need_hidden else None,
                grad_weight if need_weight else None, grad_bias if need_bias else None, acc, s == 0,
            )
            del dlogits
    return grad_hidden, grad_weight, grad_bias


@linear_logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
      backend, need_hidden, need_weight, need_bias, chunk_by="rows"):
    grad_hidden = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    grad_bias = weight.new_empty(weight.shape[:1], dtype=bias_dtype) if need_bias else weight.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend, *chunk_by = inputs
    _, entropy, lse = output
    ctx.has_bias = bias is not None
    saved = (hidden, weight, targets, lse, entropy) + ((bias,) if ctx.has_bias else ())
    ctx.save_for_backward(*saved)
    ctx.scalars = (temperature, ignore_index, chunk_size, backend, chunk_by[0] if chunk_by else "rows")


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    # lse is an internal statistic saved for backward; it is not differentiable.
    hidden, weight, targets, lse, entropy, *rest = ctx.saved_tensors
    bias = rest[0] if ctx.has_bias else None
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_bias = bool(ctx.has_bias and ctx.needs_input_grad[3])
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    temperature, ignore_index, chunk_size, backend, chunk_by = ctx.scalars
    gh, gw, gb = linear_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, ignore_index, chunk_size,
        backend, need_hidden, need_weight, need_bias, chunk_by,
    )
    return (
        gh if need_hidden else None,
        gw if need_weight else None,
        None,
        gb if need_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------- frozen head: the hidden states' gradient in the forward


@torch.library.custom_op("rlhf_kernels::linear_logprobs_frozen_head", mutates_args=())
def linear_logprobs_frozen_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp[N], direction[N, H])`` for a head that needs no gradient (LoRA, a frozen LM head), float32
    (float64 for float64 inputs).

    With ``p = softmax(z)``, ``z = (hidden @ weight.T + bias) / T``, the log-prob's
    gradient with respect to a row of ``hidden`` is its upstream gradient times
    a direction that does not depend on it::

        ∂logp_i/∂hidden_i = (onehot(y_i) - p_i) @ weight / T = (weight[y_i] - Σ_v p_iv·weight_v) / T

    So each row chunk computes its logits (matmul 1), its log-probs, its
    ``dlogits = (onehot - p) / T`` (the log-prob backward kernel with
    ``g_logp = 1``, written over the logits) and ``direction_c = dlogits @ weight``
    (matmul 2, float32 accumulation), and the backward is ``grad_hidden =
    grad_logp·direction``: 2 matmuls in all, as the materialised path, where
    recomputing the logits in backward takes 3. ``direction`` is 0 for ignored
    rows. Only ``hidden`` is differentiable.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    _validate_targets(targets, v, ignore_index, "linear_logprobs")  # before the chunks (see _validate_targets)
    stats = _stats_dtype(hidden.dtype)
    logp = hidden.new_empty((n,), dtype=stats)
    direction = _accumulator(n, hidden, stats)
    c = _chunk(n, h, v, hidden.dtype, hidden.device, chunk_size, buffers=_chunk_buffers(backend))
    buffer = _row_buffer(c, v, hidden)
    spare = _row_buffer(c, v, hidden) if _chunk_buffers(backend) == 2 else None
    for s in range(0, n, c):
        e = min(n, s + c)
        targets_c = targets[s:e]
        logits = _chunk_logits(hidden[s:e], weight, bias, buffer)
        lp, ent, lse = _kernel_fwd(logits, targets_c, temperature, ignore_index, backend)
        logp[s:e].copy_(lp)
        ones = torch.ones_like(lp)
        dlogits = _kernel_bwd(ones, torch.zeros_like(lp), logits, targets_c, lse, ent, temperature, ignore_index,
                              backend, _grad_buffer(logits, backend, spare))
        del logits
        grad_hidden_gemm(direction[s:e], dlogits, weight, True)
        del dlogits
    return logp, direction


@linear_logprobs_frozen_head.register_fake
def _(hidden, weight, targets, bias, temperature, ignore_index, chunk_size, backend):
    stats = _stats_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[:1], dtype=stats), hidden.new_empty(hidden.shape, dtype=stats)


@torch.library.custom_op("rlhf_kernels::linear_logprobs_frozen_head_bwd", mutates_args=())
def linear_logprobs_frozen_head_bwd(direction: torch.Tensor, grad_logp: torch.Tensor,
                                    hidden_dtype: torch.dtype) -> torch.Tensor:
    """``grad_hidden[N, H] = grad_logp[N, None]·direction`` in ``hidden_dtype``. A custom op without an autograd
    formula, as ``linear_logprobs_bwd``: a double backward raises instead of missing ``∂direction/∂hidden``."""
    return (direction * grad_logp.to(direction.dtype).unsqueeze(-1)).to(hidden_dtype)


@linear_logprobs_frozen_head_bwd.register_fake
def _(direction, grad_logp, hidden_dtype):
    return direction.new_empty(direction.shape, dtype=hidden_dtype)


def _frozen_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled float32 [N, H] upstream gradient for the direction output
    ctx.save_for_backward(output[1])
    ctx.hidden_dtype = inputs[0].dtype


def _frozen_backward(ctx, grad_logp, unused):
    (direction,) = ctx.saved_tensors
    grad_hidden = None
    if ctx.needs_input_grad[0] and grad_logp is not None:
        grad_hidden = linear_logprobs_frozen_head_bwd(direction, grad_logp, ctx.hidden_dtype)
    return (grad_hidden,) + (None,) * 7


linear_logprobs_frozen_head.register_autograd(_frozen_backward, setup_context=_frozen_setup_context)


def _frozen_head_path(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], return_entropy: bool,
                      chunk_by: str) -> bool:
    """``linear_logprobs_frozen_head`` serves the call: only ``hidden`` needs a gradient (neither ``weight`` nor
    ``bias``), the entropy is not returned (its gradient would need a second direction: as many matmuls as
    recomputing), and the row chunks are in use (a direction needs each row's whole log-sum-exp first)."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and not (bias is not None and bias.requires_grad) and not return_entropy and chunk_by == "rows")


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
    chunk_by: Optional[str] = None,
):
    """``logprobs(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    With ``z = (hidden @ weight.T + bias) / temperature`` (computed in the
    input dtype, one chunk of rows at a time), ``lse = logsumexp(z)``,
    ``p = softmax(z)``::

        logp    = z[y] - lse            # [*], 0 where targets == ignore_index
        entropy = lse - Σ_v p_v·z_v     # [*]

    Backward recomputes each chunk's logits: ``dz = g_logp·(onehot(y) - p) -
    g_ent·p·(log p + entropy)``, ``dlogits = dz / temperature``,
    ``grad_hidden = dlogits @ weight``, ``grad_weight = Σ_chunks dlogits.T @
    hidden`` and ``grad_bias = Σ dlogits`` accumulated in float32, then cast to
    the parameter's dtype. When only ``hidden`` needs a gradient and the
    entropy is not returned (a frozen head, as under LoRA), the forward also
    computes each row's ``(weight[y] - Σ_v p_v·weight_v) / T`` (float32
    ``[N, H]``) and the backward scales it by the upstream gradient: 2 matmuls
    instead of 3 (``linear_logprobs_frozen_head``). With ``chunk_by="vocab"`` both passes walk slabs of
    vocabulary columns over all rows instead (``_slab_forward``,
    ``_slab_gradients``): each slab's weight gradient is one GEMM over every
    token, so there is no ``[V, H]`` float32 accumulator, and ``grad_hidden``
    is accumulated in float32 instead (``[N, H]``).

    Args:
        hidden: ``[*, H]`` float32 / bfloat16 / float16 (float64 for checks);
            any strides (flattened to ``[N, H]``).
        weight: ``[V, H]`` LM head. ``hidden`` and ``weight`` (and ``bias``)
            are promoted to a common dtype when they differ.
        targets: ``[*]`` int64 / int32 ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        temperature: divides the logits, > 0.
        ignore_index: target value whose outputs and gradients are 0.
        return_entropy: also return the per-token entropy.
        chunk_size: rows per chunk (vocabulary columns per slab with
            ``chunk_by="vocab"``); ``None`` picks ~32 MiB of logits per chunk
            on the CPU and 64-256 MiB (by free memory) on the GPU.
        backend: ``"triton" | "cpu" | "torch"`` for the per-chunk reduction;
            ``None`` picks as ``rk.logprobs`` does.
        chunk_by: ``"rows"`` (row chunks), ``"vocab"`` (vocabulary slabs: the
            least memory when a 16-bit weight needs a gradient, the same 4
            matmuls), or ``"auto"`` (``None``: ``RLHF_KERNELS_LINEAR_CHUNK_BY``,
            else ``"auto"``): on the GPU the slabs when a 16-bit weight needs a
            gradient (the row chunks would hold a ``[V, H]`` float32
            accumulator), else the rows, as also when ``chunk_size`` is given
            (``logprobs_chunk_by``).
            The two are within 5% of each other on the CPU at GPT-2 size
            (``benchmarks/results/cpu-linear``).

    Returns:
        ``logp`` float32 ``[*]``, or ``(logp, entropy)`` when ``return_entropy``.
        Memory beyond inputs and outputs: one chunk of logits (two in backward,
        plus the float32 weight-gradient accumulator for bf16/fp16 weights, or
        with ``chunk_by="vocab"`` the ``[N, H]`` float32 ``grad_hidden``
        accumulator).

    Under ``torch.autocast`` (this and the two losses below) the inputs are cast
    to the autocast dtype, as ``F.linear`` casts them, and every GEMM runs in it.
    """
    hidden, weight, bias, autocast_off = autocast_linear(hidden, weight, bias)
    with autocast_off:  # the GEMMs in autocast's dtype on every path (autocast_linear)
        _check_linear_args(hidden, weight, targets, bias, chunk_size, ignore_index)
        temperature = check_positive("temperature", temperature)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        chunk_by = logprobs_chunk_by(chunk_by, weight if grad else None, chunk_size)
        lead = hidden.shape[:-1]
        hidden2, weight2, bias2 = _promoted(hidden, weight, bias)
        chosen = resolve_for("linear_logprobs", hidden2, backend, IMPLEMENTED)
        if _frozen_head_path(hidden, weight, bias, return_entropy, chunk_by):
            logp, _ = linear_logprobs_frozen_head(
                hidden2, weight2, targets.reshape(-1).long(), bias2, temperature, int(ignore_index),
                0 if chunk_size is None else int(chunk_size), chosen,
            )
            return logp.reshape(lead)
        logp, entropy, _ = linear_logprobs_fwd(
            hidden2,
            weight2,
            targets.reshape(-1).long(),
            bias2,
            temperature,
            int(ignore_index),
            0 if chunk_size is None else int(chunk_size),
            chosen,
            chunk_by,
        )
        logp, entropy = logp.reshape(lead), entropy.reshape(lead)
        return (logp, entropy) if return_entropy else logp


def linear_ppo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    temperature: float = 1.0,
    loss_agg: str = "token-mean",
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    grad_in_forward: Optional[bool] = None,
    chunk_by: Optional[str] = None,
) -> PPOLossOutput:
    """``rk.ppo_loss`` from hidden states and the LM head, never materialising the logits.

    ``logp, entropy = linear_logprobs(hidden, weight, targets, bias, return_entropy=True)``
    then, per token (DESIGN.md §2)::

        r    = exp(clamp(logp - old_logp, -20, 20))
        pg   = max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
        pg   = min(pg, -A·dual_clip)            where A < 0 (when dual_clip is set)
        term = pg + kl_coef·k(logp, ref_logp) - entropy_coef·entropy

    aggregated over ``mask`` by ``loss_agg`` (a token with ``mask == 0`` adds 0 to the loss and to every gradient,
    whatever its per-token inputs hold: ``ppo.weighted``). Shapes: ``hidden[B, T, H]``,
    ``weight[V, H]``, ``targets, old_logp, advantages, mask (, ref_logp)[B, T]``
    (``token-mean`` accepts any leading shape). Gradients flow to ``hidden``,
    ``weight`` and ``bias``.

    Gradient path (module docstring): when a gradient is needed the forward
    computes it, chunk by chunk, from ``loss = Σ w·term`` with
    ``w = aggregation_weights(mask, loss_agg)``::

        g_logp = w·∂term/∂logp      (clip / dual-clip sub-gradients as PyTorch autograd, plus kl_coef·∂k/∂logp)
        g_ent  = -w·entropy_coef
        dz     = g_logp·(onehot(y) - p) - g_ent·p·(log p + entropy),   dlogits = dz / temperature

    and the backward scales ``∂loss/∂(hidden, weight, bias)`` by the upstream
    gradient (3 matmuls in all). ``grad_in_forward=False`` (or
    ``RLHF_KERNELS_LINEAR_GRAD=recompute``) takes ``linear_logprobs``'s path
    instead: logits recomputed in backward, 4 matmuls. ``chunk_by="vocab"`` (or
    ``RLHF_KERNELS_LINEAR_CHUNK_BY=vocab``) computes the weight gradient over
    vocabulary slabs after a row sweep for the rest: no ``[V, H]`` float32
    weight-gradient accumulator (the least memory), 4 matmuls (``_vocab_slab_loss``;
    the recompute path walks slabs too); with it, ``chunk_size`` is both the row
    sweep's rows per chunk and the slab's width in vocabulary columns. ``"rows"`` forces
    the row chunks; ``"auto"`` (the default) takes them unless their accumulator
    would not fit in the GPU's free memory, or the head is 16-bit, trains and is on the CPU
    (``linear_chunk_by``).

    Returns:
        ``PPOLossOutput(loss, logp, entropy, kl, clip_frac, approx_kl)`` as ``rk.ppo_loss``.
    """
    hidden, weight, bias, autocast_off = autocast_linear(hidden, weight, bias)
    with autocast_off:  # the GEMMs in autocast's dtype on every path (autocast_linear)
        _check_linear_args(hidden, weight, targets, bias, chunk_size, ignore_index)
        lead = hidden.shape[:-1]
        check_ppo_args(
            lead, "hidden.shape[:-1]", "hidden", hidden, old_logp, advantages, mask, ref_logp,
            kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low,
            clip_high=clip_high, dual_clip=dual_clip, loss_agg=loss_agg, ignore_index=ignore_index,
        )

        options = dict(kl_coef=kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef, clip_low=clip_low,
                       clip_high=clip_high, dual_clip=None if dual_clip is None else float(dual_clip))
        grad_path = _grad_in_forward(grad_in_forward, hidden, weight, bias)
        if grad_path:
            temperature = check_positive("temperature", temperature)
            loss, logp, entropy = _fused_loss(
                hidden, weight, targets, bias, mask, old_logp, advantages, ref_logp, temperature=temperature,
                ignore_index=ignore_index, loss="ppo", loss_agg=loss_agg, chunk_size=chunk_size, backend=backend,
                chunk_by=linear_chunk_by(chunk_by, weight), **options,
            )
        else:
            loss = None
            logp, entropy = linear_logprobs(
                hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, return_entropy=True,
                chunk_size=chunk_size, backend=backend, chunk_by=chunk_by,
            )
        term, kl, clipped = composed_ppo_terms(logp, entropy, old_logp, advantages, ref_logp, mask, **options)
        return ppo_output(term, logp, entropy, kl, clipped, old_logp, mask, loss_agg, loss=loss)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    grad_in_forward: Optional[bool] = None,
    chunk_by: Optional[str] = None,
) -> torch.Tensor:
    """SFT cross-entropy ``-logp`` from hidden states and the LM head, never materialising the logits.

    ``nll = -linear_logprobs(hidden, weight, targets, bias, temperature=temperature)`` (0 where
    ``targets == ignore_index``); ``reduction="mean"`` divides by the number
    of non-ignored targets (0, not NaN, when there are none), ``"sum"`` sums,
    ``"none"`` returns float32 ``nll[*]``.

    Gradient path (module docstring): for ``"mean"`` / ``"sum"`` with a gradient
    needed, the forward computes it: ``loss = Σ w·(-logp)`` with
    ``w = valid / count`` (``mean``) or ``valid`` (``sum``), so per chunk
    ``dlogits = -w·(onehot(y) - p)`` (0 for ignored targets), then
    ``grad_hidden``, ``grad_weight``, ``grad_bias`` (3 matmuls in all); the
    backward scales them by the upstream gradient. ``"none"``,
    ``grad_in_forward=False`` or ``RLHF_KERNELS_LINEAR_GRAD=recompute``:
    ``linear_logprobs``'s recompute path (4 matmuls). ``chunk_by="vocab"``: the
    gradient over vocabulary slabs, with no ``[V, H]`` float32 accumulator (see
    ``linear_ppo_loss``).
    """
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    hidden, weight, bias, autocast_off = autocast_linear(hidden, weight, bias)
    with autocast_off:  # the GEMMs in autocast's dtype on every path (autocast_linear)
        _check_linear_args(hidden, weight, targets, bias, chunk_size, ignore_index)
        grad_path = reduction != "none" and _grad_in_forward(grad_in_forward, hidden, weight, bias)
        if grad_path:
            temperature = check_positive("temperature", temperature)
            valid = targets != ignore_index
            loss, _, _ = _fused_loss(
                hidden, weight, targets, bias, valid, None, None, None, temperature=temperature,
                ignore_index=ignore_index, loss="nll", loss_agg="token-mean" if reduction == "mean" else "sum",
                chunk_size=chunk_size, backend=backend, chunk_by=linear_chunk_by(chunk_by, weight),
            )
            return loss
        logp = linear_logprobs(
            hidden, weight, targets, bias, temperature=temperature, ignore_index=ignore_index, chunk_size=chunk_size,
            backend=backend, chunk_by=chunk_by,
        )
        nll = -logp
        if reduction == "none":
            return nll
        if reduction == "sum":
            return nll.sum()
        count = (targets != ignore_index).sum().to(nll.dtype)
        return reference._safe_divide(nll.sum(), count)
