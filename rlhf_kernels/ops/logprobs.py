"""``logprobs``: fused log-prob of the target token and entropy, forward and backward.

Registered as the custom ops ``rlhf_kernels::logprobs_fwd`` / ``logprobs_bwd``
(fake impls + autograd, so ``torch.compile(fullgraph=True)`` traces them and
``torch.library.opcheck`` passes). Each runs one of the backends of
DESIGN.md §3; none materialises an ``[N, V]`` float32 temporary except the
``torch`` reference backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..reference import _xlogy_safe
from ._checks import (
    INDEX_DTYPES,
    WHOLE,
    as_rows,
    base_and_range,
    check_integer,
    check_logits,
    check_positive,
    check_same_device,
    check_same_shape,
    check_tensor,
    find_bad_target,
    grad_for_range,
    rows_in_range,
    zero_outside,
)
from . import _deferred_checks as deferred_checks
from ._dispatch import resolve_backend
from ._eager import eager_autograd, eager_call, needs_the_op

# Backends with a kernel for this family (the reference "torch" is implied).
IMPLEMENTED = ("triton", "cuda", "cpu")

# Backends whose kernels compute in fp32 (float64 inputs are sent elsewhere, see resolve_for).
_FP32_ONLY = ("triton", "cuda")


def resolve_for(op: str, tensor: torch.Tensor, backend: Optional[str], implemented) -> str:
    """``resolve_backend`` that keeps float64 inputs off the fp32-only GPU kernels.

    The Triton and CUDA C++ kernels accumulate in fp32; float64 inputs (gradient
    checks, oracles) go to the next backend in line when the choice is automatic
    (or comes from ``RLHF_KERNELS_BACKEND``). ``backend="triton"`` by name still
    runs Triton (in fp32); ``backend="cuda"`` by name raises, as the CUDA kernels
    are compiled for float32 / float16 / bfloat16 only.
    """
    chosen = resolve_backend(op, tensor.device, backend, implemented)
    if tensor.dtype != torch.float64 or chosen not in _FP32_ONLY:
        return chosen
    if backend == "cuda":
        raise RuntimeError(
            f"backend='cuda' cannot run {op}: its kernels take float32 / float16 / bfloat16, got float64 "
            "(use backend='torch', or 'cpu' for CPU tensors)"
        )
    if backend is None:
        chosen = resolve_backend(op, tensor.device, None, tuple(b for b in implemented if b not in _FP32_ONLY))
    return chosen


def _stats_dtype(logits: torch.Tensor) -> torch.dtype:
    """Per-token outputs are float32 (float64 for float64 logits)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class TargetCheck:
    """``with TargetCheck(targets, vocab, ignore_index, op): <queue the op's kernel>``: DESIGN §1's target check.

    Raises ``ValueError`` naming the first target outside ``[0, vocab)`` that is not ``ignore_index``. The mode
    is ``deferred_checks.mode_for(targets)``'s (``RLHF_KERNELS_VALIDATE``):

    - ``sync`` (default), on ``deferred_checks.OVERLAP_DEVICES`` (CUDA): the check is queued on entry ahead of
      the kernel, and its answer read on exit, after the kernel was queued (``deferred_checks.PendingRange``):
      the host waits for the work queued ahead of the op and the check, not for the kernel, and the GPU goes
      from the check straight into the kernel. Read on entry, the GPU idled from the check's end until the CPU
      had launched the kernel (on an H200, bf16 8192 x 151936, ``tune_triton.log`` of run 4: validate=1 against
      validate=async, 0.05 ms of the CUDA PPO step and 0.3 ms of Triton's). Read after a kernel the host had to
      wait for, the GPU idled while the CPU launched everything after it (0.5-0.9 ms of a 1.8-2.0 ms forward +
      backward, run 3). Every kernel is safe on a bad target (never read; that token's ``logp`` is NaN), so the
      queued kernel's work on a bad batch is only thrown away with the error;
    - ``sync`` elsewhere (CPU tensors, whose kernels run at once): checked on entry, before the kernel;
    - ``async``: queued; a later call (or ``check_pending_targets``) reports it (``ops/_deferred_checks.py``);
    - ``off`` (``0``): nothing. ``op`` names the caller in the error.
    """

    __slots__ = ("ignore_index", "op", "pending", "targets", "vocab")

    def __init__(self, targets: torch.Tensor, vocab: int, ignore_index: int, op: str = "logprobs"):
        self.targets, self.vocab, self.ignore_index, self.op = targets, vocab, ignore_index, op
        self.pending: Optional[deferred_checks.PendingRange] = None

    def __enter__(self):
        mode = deferred_checks.mode_for(self.targets)
        if mode == "async":
            try:
                deferred_checks.raise_finished()  # earlier calls' checks that have completed
            finally:  # this call's check is queued even when an earlier one raises
                deferred_checks.enqueue(self.targets, self.vocab, self.ignore_index, self.op)
        elif mode == "sync" and self.targets.numel():
            if self.targets.device.type in deferred_checks.OVERLAP_DEVICES:
                self.pending = deferred_checks.PendingRange(self.targets, self.ignore_index)
            else:
                self._raise_if_bad(find_bad_target(self.targets, self.vocab, self.ignore_index))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.pending is not None:  # an error from the body wins over the check's
            lo, hi = self.pending.read()
            if lo < 0 or hi >= self.vocab:
                self._raise_if_bad(find_bad_target(self.targets, self.vocab, self.ignore_index, checked=True))
        return False

    def _raise_if_bad(self, bad: Optional[tuple]) -> None:
        if bad is not None:
            raise ValueError(deferred_checks.bad_target_message(*bad, self.vocab, self.ignore_index))


def _validate_targets(targets: torch.Tensor, vocab: int, ignore_index: int, op: str = "logprobs") -> None:
    """``TargetCheck`` with nothing queued inside: the whole check now (the fused-linear ops, which call it
    before their first chunk; a sync there costs little beside tens of milliseconds of matmuls)."""
    with TargetCheck(targets, vocab, ignore_index, op):
        pass


def _torch_fwd(rows: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int):
    """Reference forward on ``[B, T, V]`` rows (materialises the log-softmax)."""
    z = rows.to(_stats_dtype(rows)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    log_p = torch.log_softmax(z, dim=-1)  # not z - lse: that cancels badly for |z| ~ 1e4
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < rows.shape[-1])
    safe = torch.where(valid & in_range, targets, torch.zeros_like(targets))
    logp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(in_range, logp, torch.full_like(logp, float("nan")))
    entropy = -_xlogy_safe(log_p.exp(), log_p).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), lse


def _torch_bwd(grad_logp, grad_entropy, rows, targets, lse, entropy, temperature: float, ignore_index: int):
    """Reference backward: ``dz = g_logp·(onehot(y) - p) - g_ent·p·(log p + H)``."""
    z = rows.to(lse.dtype) / temperature
    log_p = z - lse.unsqueeze(-1)
    p = log_p.exp()
    shifted = torch.where(p > 0, log_p + entropy.unsqueeze(-1), torch.zeros_like(p))
    dz = -grad_logp.unsqueeze(-1) * p - grad_entropy.unsqueeze(-1) * p * shifted
    valid = (targets != ignore_index) & (targets >= 0) & (targets < rows.shape[-1])
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    dz.scatter_add_(-1, safe.unsqueeze(-1), torch.where(valid, grad_logp, torch.zeros_like(grad_logp)).unsqueeze(-1))
    dz = torch.where((targets != ignore_index).unsqueeze(-1), dz, torch.zeros_like(dz))
    return (dz / temperature).to(rows.dtype)


def range_lead(logits: torch.Tensor, row_start: int, row_count: int) -> tuple[int, ...]:
    """Leading shape of the rows an op computes on (``rows_in_range``), without slicing (fake impls)."""
    if row_count == WHOLE:
        return tuple(logits.shape[:-1])
    return (logits.shape[0], row_count)


def grad_like(logits: torch.Tensor, row_start: int, row_count: int, write) -> torch.Tensor:
    """The gradient w.r.t. an op's ``logits`` argument, shaped like it, from ``write(out)``.

    ``write(out)`` writes the gradient of the op's rows ``[B, T, V]`` into ``out``
    (``None``: return a new tensor) and returns what it wrote. With ``row_count ==
    WHOLE`` that is the result; otherwise ``logits`` is the ``[B, L, V]`` base of
    the rows, and the kernel writes rows ``[row_start, row_start + row_count)``
    of a ``[B, L, V]`` gradient in place, the other ``B·(L - row_count)·V``
    elements being zeroed (no full zero-fill, no copy).
    """
    if row_count == WHOLE:
        return write(None).reshape(logits.shape)
    full, inner = grad_for_range(logits, row_start, row_count)
    written = write(inner)
    if written is not inner:  # a backend without strided output (the reference): copy its rows
        inner.copy_(written)
    return zero_outside(full, row_start, row_count)


def overwritable(logits: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether an op's gradient can be written over ``logits`` (``overwrite_logits=True``): a contiguous tensor whose
    rows ``rows`` (``as_rows`` of its range) are a view of it, not a copy. (Contiguous: an in-place scale of the
    gradient downstream, ``_forward_grads.scale_grad_unless_one``, takes a contiguous one.)"""
    return logits.is_contiguous() and rows.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()


def grad_over(logits: torch.Tensor, rows: torch.Tensor, row_start: int, row_count: int, write) -> torch.Tensor:
    """``grad_like`` written over ``logits`` itself (``overwritable``): ``write(rows)`` writes the rows' gradient over
    them, the other rows of a range become its zeros, and ``logits``' version counter moves (a backward that saved
    their values then raises). Returns a new tensor object over ``logits``' storage, the gradient."""
    written = write(rows)
    if written is not rows:  # a backend without strided output (the reference): copy its rows
        rows.copy_(written.reshape(rows.shape))
    full = logits.detach()
    if row_count != WHOLE:
        zero_outside(full, row_start, row_count)
    torch.autograd.graph.increment_version(logits)
    return full


def backward_grad(overwrite: bool, writer, op, args: tuple, logits: torch.Tensor, row_start: int, row_count: int):
    """A backward's gradient w.r.t. ``logits``: ``op(*args)`` (a new tensor), or with ``overwrite`` (eager calls of
    ``overwrite_logits=True``) written over ``logits`` by ``grad_over`` when they are ``overwritable``.
    ``writer(*args)`` gives ``(rows, write)`` (``_backward_writer``, ``ppo._term_backward_writer``): every
    backend's kernel reads a column before it writes it."""
    if overwrite:
        rows, write = writer(*args)
        if overwritable(logits, rows):
            return grad_over(logits, rows, row_start, row_count, write)
    return op(*args)


def _logprobs_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
    caller: str = "logprobs",
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits[*, V]``, ``targets[*]`` (int64) -> ``(logp, entropy, lse)``, each ``[*]``.

    ``caller``: the public op a bad target's error names (``ppo_loss`` computes
    its log-probs here on the CPU). ``overwrite`` (eager calls only;
    ``logprobs(overwrite_logits=True)``): the backward writes the gradient over
    ``logits`` (``grad_over``); the forward is the same.

    With ``row_count != WHOLE``, ``logits`` is ``[B, L, V]`` and the op computes on
    its rows ``logits[:, row_start:row_start + row_count]`` (``targets`` and the
    outputs are ``[B, row_count]``); the gradient comes back shaped like ``logits``.
    """
    logits = rows_in_range(logits, row_start, row_count)
    lead = logits.shape[:-1]
    rows = as_rows(logits)
    flat_targets = targets.reshape(rows.shape[:2])
    with TargetCheck(targets, logits.shape[-1], ignore_index, caller):  # read after the kernel is queued
        if backend in ("cpu", "cuda"):  # the compiled op dispatches on the device
            out = torch.ops.rlhf_kernels_C.logprobs_fwd(rows, flat_targets.contiguous(), temperature, ignore_index)
        elif backend == "triton":
            from ..triton.logprobs import logprobs_fwd as triton_fwd

            out = triton_fwd(rows, flat_targets, temperature, ignore_index)
        else:
            out = _torch_fwd(rows, flat_targets, temperature, ignore_index)
    return tuple(t.reshape(lead) for t in out)


logprobs_fwd = torch.library.custom_op("rlhf_kernels::logprobs_fwd", mutates_args=())(_logprobs_fwd)


@logprobs_fwd.register_fake
def _(logits, targets, temperature, ignore_index, backend, row_start=0, row_count=WHOLE, caller="logprobs",
      overwrite=False):
    shape = range_lead(logits, row_start, row_count)
    dtype = _stats_dtype(logits)
    return tuple(logits.new_empty(shape, dtype=dtype) for _ in range(3))


def _logprobs_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    backend: str,
    row_start: int = 0,
    row_count: int = WHOLE,
) -> torch.Tensor:
    """Gradient of ``(logp, entropy)`` w.r.t. ``logits``, shaped like ``logits`` (contiguous), in its dtype.

    With a row range (``row_count != WHOLE``, see ``logprobs_fwd``) the kernel
    writes the range's rows of the ``[B, L, V]`` gradient directly and the rows
    outside it are zero (``grad_like``).
    """
    rows, write = _backward_writer(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index,
                                   backend, row_start, row_count)
    return grad_like(logits, row_start, row_count, write)


logprobs_bwd = torch.library.custom_op("rlhf_kernels::logprobs_bwd", mutates_args=())(_logprobs_bwd)
logprobs_bwd_call = eager_call(logprobs_bwd, _logprobs_bwd)  # what the backward calls


def _backward_writer(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend,
                     row_start, row_count):
    """``(rows, write)``: the rows the backward computes on, and ``write(out)``, which writes their gradient into
    ``out`` (``None``: a new tensor) on ``backend`` and returns what it wrote (``grad_like`` / ``grad_over``)."""
    rows = as_rows(rows_in_range(logits, row_start, row_count))
    shape2 = rows.shape[:2]
    args = [t.reshape(shape2).to(lse.dtype).contiguous() for t in (grad_logp, grad_entropy, lse, entropy)]
    flat_targets = targets.reshape(shape2).contiguous()

    def write(out):
        if backend in ("cpu", "cuda"):
            if out is None:
                return torch.ops.rlhf_kernels_C.logprobs_bwd(
                    args[0], args[1], rows, flat_targets, args[2], args[3], temperature, ignore_index
                )
            torch.ops.rlhf_kernels_C.logprobs_bwd_out(
                args[0], args[1], rows, flat_targets, args[2], args[3], temperature, ignore_index, out
            )
            return out
        if backend == "triton":
            from ..triton.logprobs import logprobs_bwd as triton_bwd

            return triton_bwd(args[0], args[1], rows, flat_targets, args[2], args[3], temperature, ignore_index, out)
        return _torch_bwd(args[0], args[1], rows, flat_targets, args[2], args[3], temperature, ignore_index)

    return rows, write


@logprobs_bwd.register_fake
def _(grad_logp, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, backend, row_start=0,
      row_count=WHOLE):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, temperature, ignore_index, backend, row_start, row_count, _caller, overwrite = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.backend = temperature, ignore_index, backend
    ctx.row_range = (row_start, row_count)
    ctx.overwrite = overwrite


def _backward(ctx, grad_logp, grad_entropy, grad_lse):
    # lse is an internal statistic saved for backward; it is not differentiable.
    logits, targets, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    args = (grad_logp, grad_entropy, logits, targets, lse, entropy, ctx.temperature, ctx.ignore_index, ctx.backend,
            *ctx.row_range)  # fmt: skip
    grad = backward_grad(ctx.overwrite, _backward_writer, logprobs_bwd_call, args, logits, *ctx.row_range)
    return (grad,) + (None,) * 8


logprobs_fwd_call = eager_autograd(logprobs_fwd, _logprobs_fwd, _backward, _setup_context)


def logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: Optional[str] = None,
    overwrite_logits: bool = False,
):
    """Log-probability of each target token, and optionally the entropy, in one pass.

    With ``z = logits / temperature``, ``lse = logsumexp(z)``, ``p = softmax(z)``::

        logp    = z[y] - lse                  # [*]
        entropy = lse - Σ_v p_v·z_v           # [*], = -Σ p·log p

    Both are 0.0 where ``targets == ignore_index``. Gradients flow to ``logits``
    (``dz = g_logp·(onehot(y) - p) - g_ent·p·(log p + entropy)``, divided by
    ``temperature``), in the logits' dtype.

    Args:
        logits: ``[*, V]`` float32 / bfloat16 / float16 (float64 for checks).
            The vocab dim needs stride 1; rows may be strided (``logits[:, :-1]``
            works without a copy). When ``logits`` is a slice ``base[:, a:a+T]`` of
            the model's ``[B, L, V]`` output (in eager mode), the gradient is written
            straight into a tensor shaped like ``base`` (``_checks.slice_of_base``):
            no ``[B, L, V]`` zero-fill plus copy by autograd's slice backward.
        targets: ``[*]`` int64 / int32 token ids in ``[0, V)`` or ``ignore_index``.
        temperature: divides the logits (sampling temperature), > 0.
        ignore_index: target value whose outputs (and gradients) are 0.
        return_entropy: also return the per-token entropy.
        backend: ``"triton" | "cuda" | "cpu" | "torch"``; ``None`` picks
            automatically (for CUDA tensors the first of
            ``_dispatch.GPU_PREFERENCE["logprobs"]``, CUDA then Triton; the C++ kernel
            for CPU tensors; float64 logits skip Triton and CUDA, which accumulate
            in fp32). ``"cuda"`` runs the hand-written kernels of
            ``csrc/cuda/logprobs.cu`` (float32 / float16 / bfloat16).
        overwrite_logits: the backward writes the gradient over ``logits``
            (their ``[B, L, V]`` base for a ``logits[:, :-1]`` view) instead of
            into a new tensor: no gradient-sized buffer at backward time (bf16
            8192 x 151936: 2.4 GB), as Liger-Kernel's ``inplace=True``. The
            logits' values are gone after the backward; their version counter
            moves, so a later backward that saved them raises rather than reading
            the gradient. Eager calls on a contiguous base, every backend; under
            ``torch.compile`` the logits are left as they are.

    Returns:
        ``logp`` float32 ``[*]``, or ``(logp, entropy)`` when ``return_entropy``.

    Raises:
        TypeError / ValueError naming the argument on bad dtypes or shapes, and
        ValueError naming the position of a target outside ``[0, V)``
        (a host sync; ``RLHF_KERNELS_VALIDATE=0`` disables it, ``async`` queues it
        and the next op raises it: ``ops/_deferred_checks.py``).
    """
    return logprobs_for(
        "logprobs", logits, targets, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, backend=backend, overwrite_logits=overwrite_logits,
    )


def logprobs_for(caller: str, logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False,
                 backend=None, overwrite_logits=False):
    """:func:`logprobs` on behalf of the public op ``caller``, which a bad target's error then names."""
    check_logits("logits", logits)
    check_tensor("targets", targets, INDEX_DTYPES)
    check_same_shape("targets", targets, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device("logits", logits, targets=targets)
    temperature = check_positive("temperature", temperature)
    check_integer("ignore_index", ignore_index)
    if not isinstance(overwrite_logits, bool):
        raise TypeError(f"overwrite_logits must be True or False, got {overwrite_logits!r}")
    chosen = resolve_for("logprobs", logits, backend, IMPLEMENTED)
    source, row_start, row_count = base_and_range(logits)
    overwrite = overwrite_logits and torch.is_grad_enabled() and not needs_the_op((source,))
    logp, entropy, _ = logprobs_fwd_call(
        source, targets.long(), temperature, int(ignore_index), chosen, row_start, row_count, caller, overwrite
    )
    return (logp, entropy) if return_entropy else logp
