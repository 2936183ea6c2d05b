"""The token-id argument of a drop-in, checked under the name its library gives it (TRL's ``index``, verl's and
OpenRLHF's ``labels``): the fused op would otherwise report a bad one as ``targets``, a name the caller never
wrote."""

from __future__ import annotations

from ..ops._checks import INDEX_DTYPES, check_logits, check_same_device, check_same_shape, check_tensor


def check_ids(name: str, ids, logits) -> None:
    """``ids``: an int64 / int32 tensor shaped like ``logits.shape[:-1]`` on ``logits``' device."""
    check_logits("logits", logits)
    check_tensor(name, ids, INDEX_DTYPES)
    check_same_shape(name, ids, logits.shape[:-1], "logits.shape[:-1]")
    check_same_device("logits", logits, **{name: ids})

