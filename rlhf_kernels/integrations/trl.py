"""Drop-in replacements for TRL's log-prob / entropy helpers, and an opt-in patch.

TRL (checked against trl 1.16) computes per-token log-probs and entropies in
``trl.trainer.utils`` with chunked eager loops that materialise a
``log_softmax`` per row (and, for bf16, in bf16). The functions here have
exactly TRL's signatures and return values (shape *and* dtype: outputs are in
``logits.dtype``, like TRL's), but run the fused ``rk.logprobs`` op: one pass
over the vocabulary, float32 accumulation, no ``[N, V]`` float32 temporary,
and the gradient written straight into ``dlogits``.

Nothing is patched on import (DESIGN.md §7). Either call the functions
directly, or swap them into TRL for a block or for the rest of the process::

    from rlhf_kernels.integrations.trl import patch_trl

    with patch_trl():           # restores TRL's originals on exit
        trainer.train()

    handle = patch_trl()        # until handle.restore() (or unpatch_trl())

    patch_trl(lm_head=True)     # also route TRL's fused LM head (GRPO / RLOO) to rk.linear_logprobs

Differences from TRL, all on inputs TRL does not define a result for:
``index == -100`` gives a log-prob of 0 (TRL's ``gather`` raises); masked
vocabulary entries (``-inf`` logits) contribute 0 to the entropy (TRL's
fp32 path returns NaN); bf16 / fp16 inputs are reduced in float32, so results
are *more* accurate than TRL's and agree with them to bf16 rounding.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..ops._checks import INDEX_DTYPES, check_tensor
from ..ops.linear import linear_logprobs as _rk_linear_logprobs
from ..ops.logprobs import logprobs as _rk_logprobs
from ._ids import check_ids
from ._patching import ModulePatch

__all__ = [
    "FusedLMHeadFunction",
    "entropy_from_logits",
    "patch_trl",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch_trl",
]

# A target id TRL can never pass (its gather would raise); marks skipped rows.
_SKIP = -100


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError("temperature must be positive")


def _masked_targets(index: torch.Tensor, row_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``index`` with rows where ``row_mask == 0`` set to the skip id (0 output, 0 gradient)."""
    if row_mask is None:
        return index
    if row_mask.shape != index.shape:
        raise ValueError(f"row_mask must have the shape of index {tuple(index.shape)}, got {tuple(row_mask.shape)}")
    return index.masked_fill(row_mask == 0, _SKIP)


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: ``log_softmax(logits / temperature).gather(-1, index)``, fused.

    Args:
        logits: ``[..., V]`` float tensor (rows may be strided, e.g. ``logits[:, :-1]``).
        index: ``[...]`` (one id per row) or ``[..., K]`` (``K`` ids per row, e.g. top-K),
            int64 / int32.
        temperature: divides the logits, > 0.
        row_mask: optional, shaped like ``index``; entries where it is 0 give 0
            (and no gradient).

    Returns:
        log-probs shaped like ``index``, in ``logits.dtype`` (TRL's dtype);
        gradients flow to ``logits`` in its dtype.

    The ``[..., K]`` form calls the fused op once (for ``index[..., 0]``) and
    gets the other ``K - 1`` columns as ``logp_0 + z[idx_k] - z[idx_0]``, whose
    gradient ``onehot(idx_k) - p`` is exact; only the gather's small scatter
    is added in the backward.
    """
    _check_temperature(temperature)
    check_tensor("index", index, INDEX_DTYPES)
    if index.dim() == logits.dim() - 1:
        check_ids("index", index, logits)
        logp = _rk_logprobs(logits, _masked_targets(index, row_mask), temperature=float(temperature))
        return logp.to(logits.dtype)
    if index.dim() != logits.dim() or index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"index must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])} or "
            f"(*logits.shape[:-1], K), got {tuple(index.shape)}"
        )
    k = index.shape[-1]
    if k == 0:
        return logits.new_zeros(index.shape)
    first = index[..., 0]
    logp0 = _rk_logprobs(logits, first, temperature=float(temperature))
    compute = logp0.dtype
    z_sel = torch.gather(logits, -1, index.long()).to(compute) / temperature
    logp = logp0.unsqueeze(-1) + (z_sel - z_sel[..., :1])
    if row_mask is not None:
        if row_mask.shape != index.shape:
            raise ValueError(
                f"row_mask must have the shape of index {tuple(index.shape)}, got {tuple(row_mask.shape)}"
            )
        logp = logp.masked_fill(row_mask == 0, 0.0)
    return logp.to(logits.dtype)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits``: Shannon entropy (nats) of ``softmax(logits)`` per row, fused.

    ``logits[..., V]`` -> entropy ``[...]`` in ``logits.dtype``, differentiable.
    ``chunk_size`` is accepted for signature compatibility (must be >= 1): the
    fused op never materialises the softmax, so there is nothing to chunk.
    """
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape (..., num_classes), got {tuple(logits.shape)}")
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, entropy = _rk_logprobs(logits, targets, return_entropy=True)
    return entropy.to(logits.dtype)


def selective_log_softmax_and_entropy(
    logits: torch.Tensor,
    index: torch.Tensor,
    entropy_requires_grad: bool = True,
    temperature: float = 1.0,
    row_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``selective_log_softmax_and_entropy``: log-prob of ``index`` and entropy in one pass.

    ``logits[..., V]``, ``index[...]`` -> ``(logp[...], entropy[...])`` in
    ``logits.dtype``; rows where ``row_mask == 0`` give 0 for both. With
    ``entropy_requires_grad=False`` the entropy is detached (no gradient flows
    from it).
    """
    _check_temperature(temperature)
    if index.dim() != logits.dim() - 1:
        # TRL's fallback supports only one id per row here as well (its entropy is per row).
        raise ValueError(
            f"index must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(index.shape)}"
        )
    check_ids("index", index, logits)
    logp, entropy = _rk_logprobs(
        logits, _masked_targets(index, row_mask), temperature=float(temperature), return_entropy=True
    )
    if not entropy_requires_grad:
        entropy = entropy.detach()
    return logp.to(logits.dtype), entropy.to(logits.dtype)


class FusedLMHeadFunction:
    """Stand-in for TRL's ``ChunkedLogProbFunction`` (the fused LM head of ``add_fused_lm_head``).

    ``apply(hidden[N, H], weight[V, H], bias, targets[N], temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs)`` returns TRL's 5-tuple
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (float32
    ``[N]`` or ``None``) through ``rk.linear_logprobs`` when only ``log_probs``
    and ``entropy`` are requested and there is no soft-capping (GRPO / RLOO and
    reference models); any other request goes to TRL's own function. The
    projection runs in the autocast dtype when autocast is on (TRL's rule), else
    in ``hidden``'s dtype.
    """

    SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy"})

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs",)):
        if final_logit_softcapping is not None or not logit_scale > 0 or not set(outputs) <= (
            FusedLMHeadFunction.SUPPORTED_OUTPUTS
        ):
            from trl.kernels import ChunkedLogProbFunction

            return ChunkedLogProbFunction.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        device_type = hidden.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
        want_entropy = "entropy" in outputs
        with torch.autocast(device_type, enabled=False):
            out = _rk_linear_logprobs(
                hidden.to(dtype),
                weight.to(dtype),
                targets,
                None if bias is None else bias.to(dtype),
                temperature=float(temperature) / float(logit_scale),
                return_entropy=want_entropy,
            )
        logp, entropy = out if want_entropy else (out, None)
        return logp, entropy, None, None, None


# --------------------------------------------------------------------------- patching

_REPLACEMENTS = {
    "selective_log_softmax": selective_log_softmax,
    "entropy_from_logits": entropy_from_logits,
    "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    "_ChunkedLogProbFunction": FusedLMHeadFunction,
}
_LM_HEAD = "_ChunkedLogProbFunction"


class patch_trl(ModulePatch):
    """Swap the fused drop-ins into TRL; a context manager that restores TRL's originals.

    ``patch_trl()`` patches immediately and returns a handle: use it as
    ``with patch_trl(): ...`` or call ``handle.restore()`` later. It replaces
    ``selective_log_softmax``, ``entropy_from_logits`` and
    ``selective_log_softmax_and_entropy`` in ``trl.trainer.utils`` (so TRL's own
    helpers and every TRL module imported afterwards pick them up) and in every
    already-imported ``trl.*`` module that holds a reference to the originals
    (e.g. ``trl.experimental.orpo.orpo_trainer``, ``...cpo``, ``...tpo``).

    TRL 1.x's GRPO / RLOO / SFT / DPO / KTO trainers do not call those three:
    they score tokens with their own chunked fused LM head (``add_fused_lm_head``
    -> ``ChunkedLogProbFunction``), already free of ``[N, V]`` float32
    temporaries. ``lm_head=True`` also swaps that for ``FusedLMHeadFunction``
    (``rk.linear_logprobs``) where the request is ``log_probs`` / ``entropy``
    only (GRPO, RLOO, reference models); it is off by default because TRL's
    head is already chunked. The three functions above are used by ORPO, CPO,
    TPO, SDPO, SDFT, A2PO and by user code.

    Nested or repeated calls are harmless: an inner call while a patch is
    active does nothing, and only the outermost patch restores. Raises
    ``ImportError`` when TRL is not installed.
    """

    package = "trl"
    home = "trl.trainer.utils"
    _active: List["patch_trl"] = []

    def __init__(self, *, lm_head: bool = False):
        super().__init__({name: fn for name, fn in _REPLACEMENTS.items() if lm_head or name != _LM_HEAD})


def unpatch_trl() -> None:
    """Restore TRL's originals, undoing every active ``patch_trl()``."""
    patch_trl.restore_all()
