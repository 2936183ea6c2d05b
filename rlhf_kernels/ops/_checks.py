"""Argument checks shared by the ops: clear errors naming the argument and shapes."""

from __future__ import annotations

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


def check_positive(name: str, value: float) -> float:
    """A finite number > 0."""
    if not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


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


def find_bad_target(targets: torch.Tensor, vocab: int, ignore_index: int) -> Optional[tuple]:
    """Position of the first target outside ``[0, vocab)`` that is not ``ignore_index`` (host sync)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if not bool(bad.any()):
        return None
    position = tuple(int(i) for i in bad.nonzero()[0].tolist())
    return position, int(targets[position])
