"""Per-token log-probs of a Hugging Face causal LM without ever building its logits.

``causal_lm_logprobs`` runs the model *body* (the decoder stack, final norm
included) to get the last hidden states and hands them with the LM head's
weight to ``rk.linear_logprobs``, so the ``[B, L, V]`` logits tensor (and its
float32 log-softmax) is never returned by the model nor materialised by us
(``linear_logprobs`` chunks over tokens / vocabulary internally)::

    from rlhf_kernels.integrations.hf import causal_lm_logprobs

    logp = causal_lm_logprobs(model, input_ids, attention_mask)           # [B, L] float32
    logp, entropy = causal_lm_logprobs(model, input_ids, attention_mask, return_entropy=True)

Works for GPT-2, Llama, Qwen2 and any model whose body is reachable through
``get_decoder()``, ``base_model``, ``.model`` or ``.transformer`` and whose head
is ``get_output_embeddings()``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops._checks import check_same_shape
from ..ops.linear import linear_logprobs

__all__ = ["causal_lm_body", "causal_lm_logprobs", "logit_scale", "shifted_targets"]


def causal_lm_body(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a causal LM (everything but the LM head).

    Tried in order: ``model.get_decoder()``, ``model.base_model`` (from
    ``base_model_prefix``), ``model.model``, ``model.transformer``; each must be
    a module other than ``model`` itself.
    """
    candidates = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(get_decoder())
        except (AttributeError, NotImplementedError, TypeError):
            pass
    for name in ("base_model", "model", "transformer"):
        candidates.append(getattr(model, name, None))
    for body in candidates:
        if isinstance(body, torch.nn.Module) and body is not model:
            return body
    raise ValueError(
        f"cannot find the decoder body of {type(model).__name__}: tried get_decoder(), base_model, .model, .transformer"
    )


def shifted_targets(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], ignore_index: int = -100):
    """Next-token targets aligned with positions: ``targets[:, t] = input_ids[:, t + 1]``.

    The last position, positions whose next token is padding and padding
    positions themselves get ``ignore_index``, so left-padded and unpadded
    sequences score the same tokens.
    """
    targets = torch.full_like(input_ids, ignore_index)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        keep = torch.zeros_like(attention_mask, dtype=torch.bool)
        keep[:, :-1] = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        targets = targets.masked_fill(~keep, ignore_index)
    return targets


def logit_scale(model: torch.nn.Module) -> float:
    """Multiplier some architectures apply to the head's output: fold it into the temperature as ``T / scale``.

    Cohere: ``logit_scale``; Granite: ``1 / logits_scaling``; 1.0 otherwise.
    Raises ``NotImplementedError`` for soft-capped logits (Gemma 2), which no
    temperature can express.
    """
    config = getattr(model, "config", None)
    if config is None:
        return 1.0
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    if getattr(text_config, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"{type(model).__name__} soft-caps its logits (final_logit_softcapping); the fused linear op does not"
        )
    scale = getattr(text_config, "logit_scale", None)  # Cohere: logits * logit_scale
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale = 1.0 / float(text_config.logits_scaling)
    return 1.0 if scale is None else float(scale)


def causal_lm_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    targets: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    chunk_by: Optional[str] = None,
    **model_kwargs,
):
    """Log-prob of each next token (and the entropy) under a causal LM, via the fused linear op.

    Computes ``log_softmax(lm_head(body(input_ids)) / temperature)[t, targets[t]]``
    without materialising the logits: ``rk.linear_logprobs(hidden, W, targets, bias)``.

    Args:
        model: a ``*ForCausalLM`` (GPT-2, Llama, Qwen2, ...).
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]`` (1 = token, 0 = padding), passed to the model.
        targets: ``[B, L]`` ids that position ``t`` is scored on (``ignore_index``
            to skip). Default: ``shifted_targets(input_ids, attention_mask)``:
            position ``t`` predicts token ``t + 1``; the last position and
            padding are skipped.
        temperature: divides the logits (> 0).
        return_entropy: also return the per-position entropy.
        ignore_index: the skip id in ``targets``; skipped positions give 0.
        chunk_size, chunk_by: forwarded to ``rk.linear_logprobs``. With a frozen
            LM head (LoRA: the head's weight does not require grad) and no
            entropy asked for, the op computes the body's gradient in the
            forward (2 matmuls instead of 3).
        **model_kwargs: forwarded to the body (``position_ids``, ...).

    Returns:
        float32 ``logp[B, L]`` (``logp[:, t] = log p(targets[:, t] | x_{<=t})``),
        and ``entropy[B, L]`` when ``return_entropy``. Gradients flow to the
        model's parameters (the LM head's weight and bias included).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got {tuple(input_ids.shape)}")
    if attention_mask is not None:
        check_same_shape("attention_mask", attention_mask, input_ids.shape, "input_ids")
    if targets is None:
        targets = shifted_targets(input_ids, attention_mask, ignore_index)
    else:
        check_same_shape("targets", targets, input_ids.shape, "input_ids")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    scale = logit_scale(model)
    if not scale > 0:
        raise NotImplementedError(f"logit scale {scale} <= 0 cannot be folded into the temperature")

    body = causal_lm_body(model)
    model_kwargs.setdefault("use_cache", False)
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    weight, bias = head.weight, getattr(head, "bias", None)
    hidden = hidden.to(weight.device)
    if hidden.dtype != weight.dtype:  # e.g. an fp32 head on a bf16 body
        hidden = hidden.to(weight.dtype)
    return linear_logprobs(
        hidden,
        weight,
        targets.to(weight.device),
        bias,
        temperature=float(temperature) / scale,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        chunk_by=chunk_by,
    )
