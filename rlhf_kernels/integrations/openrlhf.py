"""Drop-in replacements for OpenRLHF's log-prob and entropy helpers, and an opt-in patch.

OpenRLHF (checked against openrlhf 0.11.2) scores tokens in ``Actor.forward``
with two helpers of ``openrlhf.models.utils``:

- ``log_probs_from_logits(logits, labels, temperature=1.0)``: for float32
  logits flash-attn's cross-entropy or ``gather`` minus a chunked
  ``logsumexp`` (whose backward builds the ``[N, V]`` softmax), for 16-bit
  logits a Python loop over rows of ``log_softmax`` in that dtype;
- ``compute_entropy(logits)``: ``logsumexp(z) - Σ softmax(z)·z`` under
  ``torch.compile``.

The functions here take the same arguments and give the same values through
the fused ``rk.logprobs`` op: one pass over the vocabulary, float32
accumulation, and the gradient written straight into ``dlogits``.

Nothing is patched on import (DESIGN.md §7). Either call the functions, or swap
them into OpenRLHF for a block or for the rest of the process::

    from rlhf_kernels.integrations.openrlhf import patch_openrlhf

    with patch_openrlhf():      # restores OpenRLHF's originals on exit
        trainer.fit(...)

    handle = patch_openrlhf()   # until handle.restore() (or unpatch_openrlhf())

The patch acts in the process that calls it: in each rank's training script
for OpenRLHF's DeepSpeed-launched trainers, and in the Ray workers that hold
PPO's actors (Ray's ``runtime_env={"worker_process_setup_hook":
"rlhf_kernels.integrations.openrlhf.patch_openrlhf"}`` runs it in each).

Differences from OpenRLHF, on inputs where its result is less exact or
undefined: the outputs are float32 whatever the logits' dtype (OpenRLHF's row
loop returns bf16 / fp16 log-probs for 16-bit logits; its ``Actor`` casts the
logits to float32 first, so in the trainer both are float32); a label equal to
-100 gives a log-prob of 0 (OpenRLHF's ``gather`` raises, flash-attn gives 0);
masked vocabulary entries (``-inf`` logits) add 0 to the entropy (OpenRLHF's
gives NaN).
"""

from __future__ import annotations

from typing import List

import torch

from ..ops.logprobs import logprobs as _rk_logprobs
from ._ids import check_ids
from ._patching import ModulePatch

__all__ = ["compute_entropy", "log_probs_from_logits", "patch_openrlhf", "unpatch_openrlhf"]


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's ``log_probs_from_logits``: ``log softmax(logits / temperature)[label]`` per position, fused.

    ``logits[..., V]``, ``labels[...]`` (int64 / int32) -> float32 ``[...]``;
    differentiable w.r.t. ``logits`` (gradient in its dtype). Like OpenRLHF's,
    a ``temperature`` other than 1 divides ``logits`` **in place** first (its
    callers read the scaled logits afterwards, e.g. for the entropy), so the
    values and that side effect both match. ``temperature`` must be > 0.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_ids("labels", labels, logits)  # before the in-place division below
    if temperature != 1.0:
        logits.div_(temperature)
    return _rk_logprobs(logits, labels)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``compute_entropy``: Shannon entropy (nats) of ``softmax(logits)`` per row, fused.

    ``logits[..., V]`` -> float32 ``[...]`` (OpenRLHF's dtype for the float32
    logits its ``Actor`` passes), ``H = lse - Σ p·z`` reduced in float32;
    differentiable w.r.t. ``logits``.
    """
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., vocab_size), got {tuple(logits.shape)}")
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _rk_logprobs(logits, targets, return_entropy=True)
    return entropy


_REPLACEMENTS = {"log_probs_from_logits": log_probs_from_logits, "compute_entropy": compute_entropy}


class patch_openrlhf(ModulePatch):
    """Swap the fused drop-ins into OpenRLHF; a context manager that restores OpenRLHF's originals.

    ``patch_openrlhf()`` patches immediately and returns a handle (use it as
    ``with patch_openrlhf(): ...`` or call ``handle.restore()``). It replaces
    ``log_probs_from_logits`` and ``compute_entropy`` in ``openrlhf.models.utils``
    and in every loaded ``openrlhf.*`` module that imported them by name
    (``openrlhf.models.actor``, whose ``Actor.forward`` calls both), so the policy
    and reference forwards of PPO / GRPO and the SFT / DPO log-probs run fused.

    Nested or repeated calls are harmless: an inner call while a patch is
    active does nothing, and only the outermost patch restores. Raises
    ``ImportError`` when OpenRLHF (or what ``openrlhf.models.utils`` imports,
    DeepSpeed) is not installed.
    """

    package = "openrlhf"
    home = "openrlhf.models.utils"
    _active: List["patch_openrlhf"] = []

    def __init__(self):
        super().__init__(_REPLACEMENTS)


def unpatch_openrlhf() -> None:
    """Restore OpenRLHF's originals, undoing every active ``patch_openrlhf()``."""
    patch_openrlhf.restore_all()
