"""Argument checks shared by the ops: clear errors naming the argument and shapes."""

from __future__ import annotations

import math
import numbers
import os

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)


def check_tensor(name: str, value, dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """``value`` must be a tensor (of one of ``dtypes`` when given)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_logits(name: str, logits) -> torch.Tensor:
    """A ``[*, V]`` floating tensor with at least one dimension and ``V >= 1``."""
    check_tensor(name, logits, FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [*, V] with V >= 1, got {tuple(logits.shape)}")
    return logits


def check_same_shape(name: str, value: torch.Tensor, expected: Sequence[int], expected_from: str) -> None:
    """``value.shape`` must equal ``expected`` (which comes from ``expected_from``)."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} (from {expected_from}), got {tuple(value.shape)}"
        )


def check_same_device(reference_name: str, reference: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """All tensors in ``others`` live on ``reference``'s device."""
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on {reference.device}; move them to one device"
            )


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (a Python or NumPy scalar: not a bool, not a tensor, whose conversion would hide a
    device sync) within ``[low, high]`` (either end open, or absent); returned as a float."""
    kind = type(value)  # float and int first: the ABC check costs a microsecond per option on every call
    if kind is not float and kind is not int and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        hint = " (a tensor: pass a Python number, e.g. t.item())" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    number = float(value)
    if not -math.inf < number < math.inf:  # (NaN too; not math.isfinite, which torch.compile cannot trace)
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        left = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
        right = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f"in {left}{right}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise ValueError(f"{name} must be {where}, got {value!r}")
    return number


def check_positive(name: str, value: float) -> float:
    """A finite number > 0."""
    return check_number(name, value, low=0.0, low_open=True)


def check_integer(name: str, value) -> int:
    """An integer (a Python or NumPy one, not a bool), returned as an int."""
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def check_chunk_size(chunk_size) -> Optional[int]:
    """``None`` (chosen automatically) or an integer >= 1."""
    if chunk_size is None:
        return None
    if check_integer("chunk_size", chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    return int(chunk_size)


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """View ``logits[*, V]`` as ``[B, T, V]`` with unit vocab stride, copying only when no view exists.

    Two row levels let ``logits[:, :-1]`` of a ``[B, L, V]`` tensor through
    without a copy: row ``(b, t)`` starts at ``b·stride_b + t·stride_t``.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    lead = logits.shape[:-1]
    vocab = logits.shape[-1]
    if len(lead) == 0:
        return logits.view(1, 1, vocab)
    if len(lead) == 1:
        return logits.unsqueeze(0)
    outer = 1
    for size in lead[:-1]:
        outer *= size
    try:
        return logits.view(outer, lead[-1], vocab)
    except RuntimeError:
        return logits.reshape(outer, lead[-1], vocab)


def target_range(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[min, max]`` of the non-empty ``targets`` with ``ignore_index`` counted as 0, on their device (no sync).

    Every target is good iff ``0 <= min`` and ``max < vocab``: three small kernels answer the common case.
    """
    counted = torch.where(targets == ignore_index, 0, targets)
    return torch.stack(torch.aminmax(counted))


def find_bad_target(targets: torch.Tensor, vocab: int, ignore_index: int, checked: bool = False) -> Optional[tuple]:
    """Position and value of the first target outside ``[0, vocab)`` that is not ``ignore_index`` (host sync).

    The common answer, none, costs ``target_range``'s kernels and one read of two numbers. Only a bad target pays
    for locating it. ``checked``: the caller already knows from ``target_range`` that one is bad.
    """
    if targets.numel() == 0:
        return None
    if not checked:
        lo, hi = target_range(targets, ignore_index).tolist()  # the one host sync
        if lo >= 0 and hi < vocab:
            return None
    counted = torch.where(targets == ignore_index, 0, targets)
    hits = ((counted < 0) | (counted >= vocab)).nonzero()
    if hits.shape[0] == 0:
        return None
    position = tuple(int(i) for i in hits[0].tolist())
    return position, int(targets[position])


# ------------------------------------------------------------- row ranges of a base tensor

# ``row_count`` value meaning "every row of ``logits``": the op sees exactly the tensor it was given.
WHOLE = -1


def view_grad_enabled() -> bool:
    """The ``RLHF_KERNELS_VIEW_GRAD`` setting: ``1`` or unset routes the gradient of a ``logits[:, a:a+T]`` view
    straight into its base (``slice_of_base``), ``0`` leaves the view to autograd. Anything else is refused by
    name (a ``false`` that silently meant "on" would be worse)."""
    value = os.environ.get("RLHF_KERNELS_VIEW_GRAD", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"RLHF_KERNELS_VIEW_GRAD must be 0 or 1, got {value!r}")
    return value != "0"


def slice_of_base(view: torch.Tensor) -> Optional[tuple]:
    """``(base, a)`` when ``view`` is ``base[:, a:a+T]`` of a 3-D ``base`` whose gradient autograd tracks; else ``None``.

    Why: for ``rk.ppo_loss(logits[:, :-1], ...)`` autograd would turn the op's
    ``[B, T, V]`` gradient into a zero-filled ``[B, T+1, V]`` tensor plus a copy
    (SliceBackward). Calling the op with ``base`` and the row range instead lets
    its backward write the gradient straight into a tensor shaped like ``base``.

    Every condition is checked, and any doubt gives ``None`` (the caller then
    passes ``view`` itself, today's behaviour); ``RLHF_KERNELS_VIEW_GRAD=0`` turns
    the detection off (the view then stays in the graph, e.g. for
    ``torch.autograd.grad(loss, view)`` or hooks registered on the view later):

    - eager autograd only: not while ``torch.compile`` / fake or functional tensors
      trace (there the graph sees the plain view), grad mode on;
    - ``view`` is a plain ``torch.Tensor`` with a ``grad_fn`` (so its gradient really
      flows to ``view._base``: a view made under ``no_grad`` has none), no
      ``retain_grad()`` and no hooks of its own (they would not fire);
    - ``base = view._base`` is a plain 3-D tensor that requires grad, with the same
      dtype, device, B and V, rows that do not overlap, unit vocab stride;
    - ``view`` has ``base``'s strides and its storage offset is ``a·stride(1)`` past
      ``base``'s with ``0 <= a`` and ``a + T <= base.shape[1]``: then element
      ``(b, t, v)`` of ``view`` is element ``(b, a + t, v)`` of ``base``, by address.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return None
    if not view_grad_enabled():  # opt-out: keep the view in the autograd graph
        return None
    if type(view) is not torch.Tensor or view.grad_fn is None or view.retains_grad or view._backward_hooks:
        return None
    if torch._C._functorch.is_functorch_wrapped_tensor(view):
        return None
    base = view._base
    if base is None or type(base) is not torch.Tensor or not base.requires_grad:
        return None
    if view.dim() != 3 or base.dim() != 3 or view.numel() == 0:
        return None
    batch, rows, vocab = view.shape
    full = base.shape[1]
    if base.shape[0] != batch or base.shape[2] != vocab or base.dtype != view.dtype or base.device != view.device:
        return None
    if view.stride() != base.stride() or base.stride(2) != 1:
        return None
    stride_b, stride_t = base.stride(0), base.stride(1)
    # row-major, non-overlapping rows: an offset then names one start row
    if (full > 1 and stride_t < vocab) or (batch > 1 and stride_b < (full - 1) * stride_t + vocab):
        return None
    offset = view.storage_offset() - base.storage_offset()
    if offset == 0:
        start = 0
    elif full > 1 and stride_t > 0 and offset > 0 and offset % stride_t == 0:
        start = offset // stride_t
    else:
        return None
    if start + rows > full:
        return None
    return base, start


def base_and_range(logits: torch.Tensor) -> tuple:
    """What a public op passes to its custom op: ``(base, a, T)`` when ``slice_of_base`` finds one, else ``(logits, 0, WHOLE)``."""
    found = slice_of_base(logits)
    if found is None:
        return logits, 0, WHOLE
    base, start = found
    return base, start, logits.shape[1]


def rows_in_range(logits: torch.Tensor, row_start: int, row_count: int) -> torch.Tensor:
    """The tensor an op computes on: ``logits`` itself (``row_count == WHOLE``), else ``logits[:, row_start:row_start+row_count]``."""
    if row_count == WHOLE:
        return logits
    if logits.dim() != 3 or row_start < 0 or row_count < 0 or row_start + row_count > logits.shape[1]:
        raise ValueError(
            f"row range [{row_start}, {row_start + row_count}) needs logits of shape [B, L, V] with L >= "
            f"{row_start + row_count}, got {tuple(logits.shape)}"
        )
    return logits.narrow(1, row_start, row_count)


def grad_for_range(base: torch.Tensor, row_start: int, row_count: int):
    """``(full, inner)``: an uninitialised contiguous gradient shaped like ``base`` and its rows ``[row_start, row_start + row_count)``.

    The caller's kernel writes ``inner`` (strided: row ``(b, t)`` at
    ``b·L·V + (row_start + t)·V``), then ``zero_outside`` zeroes the other
    ``B·(L - row_count)·V`` elements (after the kernel: on the CPU the kernel's
    huge-page advice then covers the untouched buffer).
    """
    full = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    return full, full.narrow(1, row_start, row_count)


def zero_outside(full: torch.Tensor, row_start: int, row_count: int) -> torch.Tensor:
    """Zero the rows of ``full[B, L, V]`` outside ``[row_start, row_start + row_count)``; returns ``full``."""
    full[:, :row_start].zero_()
    full[:, row_start + row_count:].zero_()
    return full
