"""KL ops: per-token sample estimators (k1/k2/k3) and the exact full-vocabulary KL.

Both are ``torch.library`` custom ops (``rlhf_kernels::kl_divergence_fwd`` /
``_bwd`` and ``rlhf_kernels::kl_estimate_fwd`` / ``_bwd``) with fake impls and
registered autograd. Backends: ``triton`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` (``kl_divergence`` only:
``csrc/cuda/kl.cu``, ``csrc/cpu/kl.cpp``) and ``torch`` (the reference math,
inside the op for ``kl_divergence``; plain eager reference for ``kl_estimate``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from ._checks import (
    FLOAT_DTYPES,
    WHOLE,
    as_rows,
    base_and_range,
    check_choice,
    check_logits,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    grad_for_range,
    rows_in_range,
    zero_outside,
)
from ._eager import eager_autograd, eager_call, needs_the_op
from .logprobs import grad_like, grad_over, overwritable, range_lead, resolve_for

# Backends with a kernel (the reference "torch" is implied): exact KL, and the k1/k2/k3 estimators.
# The extension's kernels (torch.ops.rlhf_kernels_C, dispatched on the tensors' device).
_COMPILED = ("cuda", "cpu")
IMPLEMENTED = ("triton", "cuda", "cpu")
ESTIMATE_IMPLEMENTED = ("triton",)


# ------------------------------------------------------------- exact KL


def _kl_dtype(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (logits.dtype, ref_logits.dtype) else torch.float32


def _torch_kl_fwd(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float):
    dtype = _kl_dtype(logits, ref_logits)
    z = logits.to(dtype) / temperature
    r = ref_logits.to(dtype) / temperature
    lse_z = torch.logsumexp(z, dim=-1)
    lse_r = torch.logsumexp(r, dim=-1)
    # log_softmax (relative to the row's maximum), not z - lse: that cancels to ulp(lse) for |z| ~ 1e4
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(r, dim=-1)
    kl = reference._xlogy_safe(log_p.exp(), log_p - log_q).sum(-1)
    return kl, lse_z, lse_r


def _torch_kl_bwd(grad, logits, ref_logits, kl, lse_z, lse_r, temperature: float, need_ref_grad: bool):
    dtype = kl.dtype
    log_p = logits.to(dtype) / temperature - lse_z.unsqueeze(-1)
    log_q = ref_logits.to(dtype) / temperature - lse_r.unsqueeze(-1)
    p = log_p.exp()
    g = (grad.to(dtype) / temperature).unsqueeze(-1)
    inner = torch.where(p > 0, log_p - log_q - kl.unsqueeze(-1), torch.zeros_like(p))
    # 0 in a row of zero upstream gradient (a masked row, whose KL may be infinite), as the kernels
    dz = torch.where(g != 0, g * p * inner, 0.0).to(logits.dtype)
    dr = (g * (log_q.exp() - p)).to(ref_logits.dtype) if need_ref_grad else None
    return dz, dr


def _kl_divergence_fwd(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float,
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
    ref_row_start: int = 0,
    ref_row_count: int = WHOLE,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits, ref_logits[*, V]`` -> ``(kl, lse_z, lse_r)``, each ``[*]`` float32 (float64 for float64 inputs).

    Row ranges as in ``logprobs_fwd``, one per input: with ``row_count != WHOLE``
    the op reads ``logits[:, row_start:row_start + row_count]`` of a ``[B, L, V]``
    ``logits`` and its gradient is shaped like ``logits`` (likewise ``ref_*``).
    ``overwrite`` (eager calls only; ``kl_divergence(overwrite_logits=True)``): the
    backward writes ``dlogits`` over ``logits`` (``_kl_grads``); the forward is the same.
    """
    logits = rows_in_range(logits, row_start, row_count)
    ref_logits = rows_in_range(ref_logits, ref_row_start, ref_row_count)
    lead = logits.shape[:-1]
    if backend == "triton":
        from ..triton.kl import kl_divergence_fwd as triton_fwd

        out = triton_fwd(as_rows(logits), as_rows(ref_logits), temperature)
    elif backend in _COMPILED:
        out = torch.ops.rlhf_kernels_C.kl_divergence_fwd(as_rows(logits), as_rows(ref_logits), temperature)
    else:
        out = _torch_kl_fwd(logits, ref_logits, temperature)
    return tuple(t.reshape(lead) for t in out)


kl_divergence_fwd = torch.library.custom_op("rlhf_kernels::kl_divergence_fwd", mutates_args=())(_kl_divergence_fwd)


@kl_divergence_fwd.register_fake
def _(logits, ref_logits, temperature, backend, row_start=0, row_count=WHOLE, ref_row_start=0, ref_row_count=WHOLE,
      overwrite=False):
    dtype = _kl_dtype(logits, ref_logits)
    return tuple(logits.new_empty(range_lead(logits, row_start, row_count), dtype=dtype) for _ in range(3))


def _kl_grads(
    grad: torch.Tensor,
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    kl: torch.Tensor,
    lse_z: torch.Tensor,
    lse_r: torch.Tensor,
    temperature: float,
    need_ref_grad: bool,
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
    ref_row_start: int = 0,
    ref_row_count: int = WHOLE,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogits, dref_logits)`` shaped like the inputs; ``dref_logits`` is empty unless ``need_ref_grad``.

    With row ranges (``kl_divergence_fwd``) the kernel writes the range's rows of
    the ``[B, L, V]`` gradients in place and only the rows outside are zeroed.

    ``overwrite`` (eager calls of ``overwrite_logits=True`` where ``overwrites_logits`` allows it, never the
    registered op): ``dlogits`` is written over ``logits`` themselves. Every backend reads a column of ``logits``
    and ``ref_logits`` before it writes that column's gradient; the rows of ``logits`` outside a range become its
    zeros, and ``logits``' version counter moves (a backward that saved their values raises). ``dlogits`` is then
    a new tensor object over ``logits``' storage.
    """
    x = rows_in_range(logits, row_start, row_count)
    r = rows_in_range(ref_logits, ref_row_start, ref_row_count)
    # where the reference's range is given: its full gradient and the rows the kernel writes
    dr_full, dr_out = (None, None)
    if need_ref_grad and ref_row_count != WHOLE:
        dr_full, dr_out = grad_for_range(ref_logits, ref_row_start, ref_row_count)
    dr = None

    def write(dz_out):
        """The rows' dlogits written into ``dz_out`` (``None``: a new tensor) and returned (``logprobs.grad_like``
        / ``grad_over``); the same launch writes the reference's gradient, kept in ``dr``."""
        nonlocal dr
        if backend == "triton":
            from ..triton.kl import kl_divergence_bwd as triton_bwd

            rows = as_rows(x)
            shape2 = rows.shape[:2]
            dz, dr = triton_bwd(
                grad.reshape(shape2).to(kl.dtype), rows, as_rows(r), kl.reshape(shape2),
                lse_z.reshape(shape2), lse_r.reshape(shape2), temperature, need_ref_grad, dz_out, dr_out,
            )
            return dz
        if backend in _COMPILED:
            rows = as_rows(x)
            shape2 = rows.shape[:2]
            dz, dr = torch.ops.rlhf_kernels_C.kl_divergence_bwd(
                grad.reshape(shape2), rows, as_rows(r), kl.reshape(shape2), lse_z.reshape(shape2),
                lse_r.reshape(shape2), temperature, need_ref_grad, dz_out, dr_out,
            )
            dr = dr_out if dr_out is not None else dr  # written in place; an empty placeholder came back
            return dz_out if dz_out is not None else dz
        dz, dr = _torch_kl_bwd(grad, x, r, kl, lse_z, lse_r, temperature, need_ref_grad)
        return dz

    if overwrite:
        dz = grad_over(logits, as_rows(x), row_start, row_count, write)
    else:
        dz = grad_like(logits, row_start, row_count, write)
    if not need_ref_grad:
        return dz, ref_logits.new_empty(0)
    if dr_full is None:
        return dz, dr.reshape(ref_logits.shape)
    if dr is not dr_out:  # the reference computed the rows: copy them
        dr_out.copy_(dr.reshape(dr_out.shape))
    return dz, zero_outside(dr_full, ref_row_start, ref_row_count)


def overwrites_logits(logits: torch.Tensor, ref_logits: torch.Tensor, row_start: int, row_count: int) -> bool:
    """Whether ``kl_divergence``'s backward can write ``dlogits`` over ``logits`` (``overwrite_logits=True``): they
    are ``overwritable`` (contiguous, their rows a view, not a copy) and ``ref_logits`` lies in other memory (a
    gradient written over logits that are also read as the reference would be read back)."""
    if ref_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        return False
    return overwritable(logits, as_rows(rows_in_range(logits, row_start, row_count)))


kl_divergence_bwd = torch.library.custom_op("rlhf_kernels::kl_divergence_bwd", mutates_args=())(_kl_grads)
kl_divergence_bwd_call = eager_call(kl_divergence_bwd, _kl_grads)  # what the backward calls


@kl_divergence_bwd.register_fake
def _(grad, logits, ref_logits, kl, lse_z, lse_r, temperature, need_ref_grad, backend, row_start=0, row_count=WHOLE,
      ref_row_start=0, ref_row_count=WHOLE, overwrite=False):
    dr = torch.empty_like(ref_logits, memory_format=torch.contiguous_format) if need_ref_grad else ref_logits.new_empty(0)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), dr


def _kl_setup_context(ctx, inputs, output):
    logits, ref_logits, temperature, backend = inputs[:4]
    kl, lse_z, lse_r = output
    ctx.save_for_backward(logits, ref_logits, kl, lse_z, lse_r)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.row_ranges, ctx.overwrite = tuple(inputs[4:8]), inputs[8]


def _kl_backward(ctx, grad_kl, grad_lse_z, grad_lse_r):
    # lse_z / lse_r are statistics saved for backward, not differentiable outputs.
    logits, ref_logits, kl, lse_z, lse_r = ctx.saved_tensors
    if grad_kl is None:
        grad_kl = torch.zeros_like(kl)
    need_ref = bool(ctx.needs_input_grad[1])
    args = (grad_kl, logits, ref_logits, kl, lse_z, lse_r, ctx.temperature, need_ref, ctx.backend, *ctx.row_ranges)
    if ctx.overwrite and ctx.needs_input_grad[0] and overwrites_logits(logits, ref_logits, *ctx.row_ranges[:2]):
        dz, dr = _kl_grads(*args, overwrite=True)  # (eager only: the registered op never writes over its input)
    else:
        dz, dr = kl_divergence_bwd_call(*args)
    return (dz if ctx.needs_input_grad[0] else None), (dr if need_ref else None), *(None,) * 7


kl_divergence_fwd_call = eager_autograd(kl_divergence_fwd, _kl_divergence_fwd, _kl_backward, _kl_setup_context)


def kl_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Exact per-token ``KL(softmax(z) ‖ softmax(r))`` over the full vocabulary.

    ``KL = Σ_v p_v·(z_v - r_v) - lse_z + lse_r`` with ``z = logits / T``,
    ``r = ref_logits / T``; 0 where ``mask == 0``, with zero gradients there even where the row's KL is infinite
    (as in any row whose upstream gradient is 0: not ``0·inf = NaN``). One pass over both rows
    (Triton, CUDA, C++ CPU). Gradients: ``dz = p·(log p - log q - KL)``, ``dr = q - p`` (both
    ``/ T``; ``dr`` only when ``ref_logits`` requires grad), in each input's dtype.

    Shapes: ``[*, V]`` and ``[*, V]`` (+ ``mask[*]``) -> float32 ``[*]``
    (float64 when an input is float64). Rows may be strided (vocab stride 1);
    an input that is a slice ``base[:, a:a+T]`` of a ``[B, L, V]`` tensor gets its
    gradient written straight into a tensor shaped like ``base`` (eager mode;
    ``_checks.slice_of_base``). ``backend``: ``"triton" | "cuda" | "cpu" | "torch"``; ``None`` picks the first
    of ``_dispatch.GPU_PREFERENCE["kl_divergence"]`` (the CUDA kernel, then Triton) for CUDA tensors and the
    C++ kernel (``csrc/cpu/kl.cpp``) for CPU tensors. ``"cuda"`` runs ``csrc/cuda/kl.cu``; both compiled
    backends run mixed input dtypes on copies in the statistics dtype.

    ``overwrite_logits=True`` (eager calls; distillation, where the student's logits are used for nothing after
    the loss): the backward writes ``dlogits`` over ``logits`` (over their ``[B, L, V]`` base for a
    ``logits[:, :-1]`` view, whose other rows become zeros) instead of into a new tensor, so the step needs no
    gradient-sized buffer for them; every backend reads a column before it writes its gradient. The logits'
    version counter moves, so a backward that saved them raises instead of reading the gradient. Left as they are
    without a gradient, under ``torch.compile``, for a non-contiguous base, and when ``ref_logits`` shares their
    memory; ``ref_logits``' gradient, when it needs one, is always a new tensor.
    """
    check_logits("logits", logits)
    check_logits("ref_logits", ref_logits)
    check_same_shape("ref_logits", ref_logits, logits.shape, "logits")
    if mask is not None:
        check_tensor("mask", mask)
        check_same_shape("mask", mask, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device("logits", logits, ref_logits=ref_logits, mask=mask)
    temperature = check_positive("temperature", temperature)
    if not isinstance(overwrite_logits, bool):
        raise TypeError(f"overwrite_logits must be True or False, got {overwrite_logits!r}")
    probe = logits if logits.dtype == torch.float64 else ref_logits
    chosen = resolve_for("kl_divergence", probe, backend, IMPLEMENTED)
    # slices base[:, a:a+T] of [B, L, V] model outputs: the op takes the bases and the ranges, and
    # writes the gradients into [B, L, V] tensors (no zero-fill + copy by autograd's SliceBackward)
    source, row_start, row_count = base_and_range(logits)
    ref_source, ref_row_start, ref_row_count = base_and_range(ref_logits)
    # the registered op never writes over its input: only eager calls overwrite
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    overwrite = overwrite_logits and with_grad and not needs_the_op((source, ref_source))
    kl, _, _ = kl_divergence_fwd_call(
        source, ref_source, temperature, chosen, row_start, row_count, ref_row_start, ref_row_count, overwrite
    )
    if mask is not None:
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return kl


# ------------------------------------------------------------- estimators


@torch.library.custom_op("rlhf_kernels::kl_estimate_fwd", mutates_args=())
def kl_estimate_fwd(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: Optional[float], backend: str
) -> torch.Tensor:
    """Elementwise k1/k2/k3 estimate, shape of ``logp``, dtype ``promote(logp, ref_logp)``."""
    if backend == "triton":
        from ..triton.kl import kl_estimate_fwd as triton_fwd

        return triton_fwd(logp, ref_logp, estimator, clamp)
    return reference.kl_estimate(logp, ref_logp, estimator, clamp).contiguous()


@kl_estimate_fwd.register_fake
def _(logp, ref_logp, estimator, clamp, backend):
    return logp.new_empty(logp.shape, dtype=torch.promote_types(logp.dtype, ref_logp.dtype))


def _kl_estimate_bwd(
    grad: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str, clamp: Optional[float], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dlogp, dref_logp)`` in the inputs' dtypes."""
    if backend == "triton":
        from ..triton.kl import kl_estimate_bwd as triton_bwd

        return triton_bwd(grad, logp, ref_logp, estimator, clamp)
    dtype = torch.promote_types(logp.dtype, ref_logp.dtype)
    d = ref_logp.to(dtype) - logp.to(dtype)
    dk = {"k1": torch.ones_like(d), "k2": -d, "k3": -torch.expm1(d)}[estimator]
    g = grad.to(dtype) * dk
    if clamp is not None:
        k = reference.kl_estimate(logp.to(dtype), ref_logp.to(dtype), estimator)
        g = torch.where((k >= -clamp) & (k <= clamp), g, torch.zeros_like(g))
    return g.to(logp.dtype).contiguous(), (-g).to(ref_logp.dtype).contiguous()


kl_estimate_bwd = torch.library.custom_op("rlhf_kernels::kl_estimate_bwd", mutates_args=())(_kl_estimate_bwd)
kl_estimate_bwd_call = eager_call(kl_estimate_bwd, _kl_estimate_bwd)  # what the backward calls


@kl_estimate_bwd.register_fake
def _(grad, logp, ref_logp, estimator, clamp, backend):
    return torch.empty_like(logp, memory_format=torch.contiguous_format), torch.empty_like(
        ref_logp, memory_format=torch.contiguous_format
    )


def _est_setup_context(ctx, inputs, output):
    logp, ref_logp, estimator, clamp, backend = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.estimator, ctx.clamp, ctx.backend = estimator, clamp, backend


def _est_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    dlogp, dref = kl_estimate_bwd_call(grad, logp, ref_logp, ctx.estimator, ctx.clamp, ctx.backend)
    return dlogp, dref, None, None, None


kl_estimate_fwd.register_autograd(_est_backward, setup_context=_est_setup_context)


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: Optional[float] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Per-token estimate of ``KL(π ‖ π_ref)`` from sampled-token log-probs.

    With ``d = ref_logp - logp``: ``k1 = -d``; ``k2 = ½·d²``;
    ``k3 = exp(d) - d - 1`` (unbiased and non-negative). ``clamp`` clips the
    result to ``[-clamp, clamp]``. Shapes: ``[*]`` and ``[*]`` -> ``[*]``;
    differentiable w.r.t. both inputs. ``backend``: ``"triton"`` (one
    elementwise kernel, fp32 math, the default for CUDA tensors) or ``"torch"``.
    """
    check_tensor("logp", logp, FLOAT_DTYPES)
    check_tensor("ref_logp", ref_logp, FLOAT_DTYPES)
    check_same_shape("ref_logp", ref_logp, logp.shape, "logp")
    check_same_device("logp", logp, ref_logp=ref_logp)
    check_choice("estimator", estimator, reference.KL_ESTIMATORS)
    if clamp is not None:
        clamp = check_positive("clamp", clamp)
    probe = logp if logp.dtype == torch.float64 else ref_logp
    chosen = resolve_for("kl_estimate", probe, backend, ESTIMATE_IMPLEMENTED)
    if chosen == "triton":
        return kl_estimate_fwd(logp, ref_logp, estimator, clamp, chosen)
    return reference.kl_estimate(logp, ref_logp, estimator, clamp)
