"""What keeps the package importable and traceable on the oldest torch / Triton it supports (torch 2.6, Triton 3.2).

The suite runs on those versions with ``make test-oldest`` (``--oldest-versions``); these checks catch the commonest
break on the newest torch too, without installing the old one.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

import rlhf_kernels  # noqa: F401  (registers the custom ops)
from rlhf_kernels import triton as _triton_pkg  # noqa: F401


def _torch_2_6_annotation_namespace() -> dict:
    """The names torch 2.6's ``infer_schema`` resolves a string annotation with: its own module's globals
    (``from __future__ import annotations`` makes every annotation a string). Newer torch uses the function's."""
    return {"torch": torch, "typing": typing, "device": torch.device, "dtype": torch.dtype, "Tensor": torch.Tensor,
            "types": torch.types, "List": typing.List, "Optional": typing.Optional, "Sequence": typing.Sequence,
            "Union": typing.Union}


def _our_custom_ops():
    from torch._library.custom_ops import OPDEFS

    return {name: op for name, op in OPDEFS.items() if name.split("::")[0].startswith("rlhf_kernels")}


def test_custom_op_annotations_resolve_on_torch_2_6():
    """Every ``rlhf_kernels::*`` custom op's annotations evaluate in torch 2.6's ``infer_schema`` namespace.
    ``typing.Tuple`` there raised ``Unsupported type annotation`` at import; ``tuple[...]`` works on both."""
    ops = _our_custom_ops()
    assert len(ops) >= 10, sorted(ops)
    namespace = _torch_2_6_annotation_namespace()
    for name, op in ops.items():
        sig = inspect.signature(op._init_fn)
        hints = [p.annotation for p in sig.parameters.values()] + [sig.return_annotation]
        for hint in hints:
            if isinstance(hint, str):
                try:
                    eval(hint, dict(namespace))  # noqa: S307 (the annotation strings of our own ops)
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"{name}: annotation {hint!r} does not resolve on torch 2.6 ({e!r})")


def test_triton_kernels_import_without_a_gpu_driver(monkeypatch):
    """The autotuned Triton kernels build their autotuner at the first GPU launch, not at import: Triton 3.2 looked
    up the GPU driver in ``Autotuner.__init__`` and raised ``0 active drivers`` without a GPU."""
    pytest.importorskip("triton")
    from rlhf_kernels.triton import _common, kl, logprobs, ppo

    built = []
    monkeypatch.setattr(_common.triton, "autotune", lambda **kw: built.append(kw) or (lambda kernel: kernel))
    lazy = _common.row_autotune(logprobs._logprobs_fwd_kernel)
    assert built == []  # nothing built yet
    assert lazy[(1,)] is not None and len(built) == 1  # the first launch builds it
    lazy[(2,)]
    assert len(built) == 1  # once
    for tuned in (logprobs._logprobs_fwd_tuned, kl._kl_divergence_fwd_tuned, ppo._ppo_fwd_tuned):
        assert isinstance(tuned, _common._LazyAutotune)
