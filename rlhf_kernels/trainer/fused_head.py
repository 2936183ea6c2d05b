"""``--fused-head``: the policy's log-probs and losses straight from its final hidden states and LM head
weight, so the ``[B, T, V]`` logits never exist.

``FusedHeadLM(lm)`` holds a Hugging Face causal LM and its ``forward`` runs the decoder body
(``causal_lm_body``), then one fused-linear op on ``hidden[:, :-1]`` (``[B, T-1, H]``), the LM head's
``weight [V, H]`` and ``bias [V]`` (when the head has one)::

    op="logprobs"       rk.linear_logprobs(...)       -> logp [B, T-1] (, entropy [B, T-1])   (scoring, DPO)
    op="cross_entropy"  rk.linear_cross_entropy(...)  -> Σ_t -logp_t / #targets               (SFT)
    op="ppo"            rk.linear_ppo_loss(...)       -> PPOLossOutput, as rk.ppo_loss         (PPO, GRPO)
    op="generate"       lm.generate(...)              -> token ids                              (rollouts)

with the same meaning and the same targets ``[B, T-1]`` as ``rk.logprobs`` / ``rk.ppo_loss`` on
``lm(...).logits[:, :-1]``. Temperature matches the logits path exactly: architectures that scale their
logits (Cohere ``logit_scale``, Granite ``1 / logits_scaling``: ``logit_scale`` in integrations/hf.py) get
``temperature / scale``; soft-capped logits (Gemma 2) cannot be folded in and raise at construction.

Why a module and not a function of ``lm``: the trainer wraps *this* module with DDP or FSDP2 in place of
the bare model. DDP prepares its reducer (and so all-reduces the gradients) only for a forward that goes
through the wrapper, and FSDP2 unshards the root unit's parameters (embeddings, final norm, LM head) only
inside the root module's forward, so the head weight is read here, in ``forward``, never from outside.
For the same reason generation runs inside ``forward`` (``op="generate"``), so that it also works when
this module is the FSDP2 root; it is still the HF model's ``generate``.

Checkpoints keep the HF model's names: the trainer saves ``lm`` (``save_pretrained``), and the FSDP2
state-dict helpers in distributed.py strip / add ``CHECKPOINT_PREFIX`` (``"lm."``), so a checkpoint
written with ``--fused-head`` loads without it, and the other way round.
"""
from __future__ import annotations

from torch import nn

import rlhf_kernels as rk
from rlhf_kernels.integrations.hf import causal_lm_body, logit_scale

from .models import position_ids_from_mask

OPS = ("logprobs", "cross_entropy", "ppo", "generate")


class FusedHeadLM(nn.Module):
    """A causal LM whose forward returns per-token log-probs or a loss instead of logits (module docstring).

    ``forward(input_ids [B, T], attention_mask [B, T], targets [B, T-1], *, op, temperature, backend,
    return_entropy, **op_kwargs)``; ``targets[:, t]`` is the token position ``t`` is scored on
    (``-100`` = skipped), as ``data.shifted_targets`` builds them.
    """

    CHECKPOINT_PREFIX = "lm."   # parameter names are "lm." + the HF model's own

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        causal_lm_body(lm)                       # raises when the body cannot be found
        head = lm.get_output_embeddings()
        if head is None or getattr(head, "weight", None) is None:
            raise ValueError(f"fused_head: {type(lm).__name__} has no output embedding (LM head) with a weight")
        self.logit_scale = logit_scale(lm)       # raises for soft-capped logits
        if not self.logit_scale > 0:
            raise ValueError(f"fused_head: logit scale {self.logit_scale} <= 0 cannot be folded into the temperature")

    def forward(self, input_ids, attention_mask, targets=None, *, op: str = "logprobs", temperature: float = 1.0,
                backend=None, return_entropy: bool = False, **op_kwargs):
        if op == "generate":
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **op_kwargs)
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        out = causal_lm_body(self.lm)(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        head = self.lm.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        # the last position predicts nothing; [B, T-1, H] is a strided view (the op copies it: H << V)
        hidden = out.last_hidden_state[:, :-1].to(device=weight.device, dtype=weight.dtype)
        t = float(temperature) / self.logit_scale   # logits·scale / T  =  logits / (T / scale)
        if op == "logprobs":
            return rk.linear_logprobs(hidden, weight, targets, bias, temperature=t, return_entropy=return_entropy,
                                      backend=backend)
        if op == "ppo":
            return rk.linear_ppo_loss(hidden, weight, targets, bias=bias, temperature=t, backend=backend, **op_kwargs)
        # cross_entropy: the gradient-in-forward path (mean over non-ignored targets, 0 when there are none)
        return rk.linear_cross_entropy(hidden, weight, targets, bias, temperature=t, reduction="mean",
                                       backend=backend)

    def generate(self, **kwargs):
        """``lm.generate(**kwargs)``, run inside ``forward`` (see the module docstring)."""
        return self(kwargs.pop("input_ids"), kwargs.pop("attention_mask"), op="generate", **kwargs)

    def save_pretrained(self, path: str, state_dict: dict | None = None) -> None:
        """The HF model's ``save_pretrained``; ``state_dict`` is keyed by the HF names (prefix stripped)."""
        if state_dict is None:
            self.lm.save_pretrained(path)
        else:
            self.lm.save_pretrained(path, state_dict=state_dict)


def is_fused_head(model) -> bool:
    """``model`` is a ``FusedHeadLM``, bare, sharded by FSDP2 (same object) or inside a DDP wrapper."""
    return isinstance(getattr(model, "module", model), FusedHeadLM)
