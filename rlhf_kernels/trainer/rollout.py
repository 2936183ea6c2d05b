"""Rollouts: sample responses with ``generate`` and score them.

``generate_responses`` returns sequences laid out as ``[left-padded prompt | response | pad]``
with ``attention_mask`` (1 on real tokens) and ``loss_mask`` (1 on response tokens up to and
including the first EOS). ``sequence_logprobs`` evaluates per-token log-probs of the
response tokens through the fused op, aligned with ``logits[:, :-1]``, and ``policy_loss`` the
PPO / GRPO policy loss; both take either an HF causal LM (through its logits) or a
``FusedHeadLM`` (``--fused-head``: from hidden states and the LM head, no logits).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .data import collate_prompts, shifted_targets
from .distributed import dist_world, is_fsdp
from .fused_head import is_fused_head
from .models import lm_logits, logits_are_free_after_the_loss


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16


@torch.no_grad()
def generate_responses(model, tok, prompt_rows, sc: SamplingConfig, device, max_len: int = 512) -> dict:
    """Sample a response to each prompt; prompt and response together stay within ``max_len`` tokens."""
    if not 1 <= sc.max_new_tokens < max_len:
        raise ValueError(f"max_new_tokens must be in [1, max_len = {max_len}), got {sc.max_new_tokens}")
    # keep each prompt's last max_len - max_new_tokens tokens: a longer sequence would run past the model's
    # positions (an IndexError on the CPU, a device-side assert that ends the process on the GPU)
    batch = collate_prompts(prompt_rows, tok, max_len - sc.max_new_tokens)
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=sc.temperature,
                         top_k=sc.top_k, top_p=sc.top_p, max_new_tokens=sc.max_new_tokens,
                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                         # FSDP2 gathers weights inside every forward: ranks must decode the same number of
                         # steps, so finished ranks keep stepping until all are done
                         synced_gpus=is_fsdp(model) and dist_world() > 1)
    model.train(was_training)
    P = ids.shape[1]
    resp = out[:, P:]
    # response mask: every token up to and including the first EOS
    is_eos = resp == tok.eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    rmask = (~after_eos).long()
    resp = torch.where(rmask.bool(), resp, torch.full_like(resp, tok.pad_id))
    has_eos = is_eos.any(1)
    seq = torch.cat([ids, resp], 1)
    return {
        "input_ids": seq,
        "attention_mask": torch.cat([attn, rmask], 1),
        "loss_mask": torch.cat([torch.zeros_like(attn), rmask], 1),
        "has_eos": has_eos,
        "prompts": batch["prompts"],
        "responses": [tok.decode(r[m.bool()].tolist()) for r, m in zip(resp.cpu(), rmask.cpu())],
        "prompt_len": P,
    }


def sequence_logprobs(model, batch, temperature=1.0, backend=None, return_entropy=False):
    """Per-token log-probs [B, T-1] of response tokens (0 elsewhere), and the entropy [B, T-1] when asked."""
    targets = shifted_targets(batch["input_ids"], batch["loss_mask"])
    if is_fused_head(model):
        return model(batch["input_ids"], batch["attention_mask"], targets, temperature=temperature,
                     return_entropy=return_entropy, backend=backend)
    logits = lm_logits(model, batch["input_ids"], batch["attention_mask"])
    return rk.logprobs(logits[:, :-1], targets, temperature=temperature, return_entropy=return_entropy,
                       backend=backend)


def policy_loss(model, e: dict, **kw):
    """The PPO / GRPO policy loss of minibatch ``e`` (``input_ids, attention_mask [B, T]``; ``targets,
    old_logp, adv, mask [B, T-1]``): ``rk.ppo_loss`` on ``logits[:, :-1]``, or for a ``FusedHeadLM``
    (DDP-wrapped or not) ``rk.linear_ppo_loss`` inside its forward. ``kw``: ``rk.ppo_loss``'s options
    (clip, KL, entropy, temperature, loss_agg, backend). Returns ``PPOLossOutput``.

    The logits are used for nothing else, so their gradient is written over them (``overwrite_logits``: one
    ``[B, T, V]`` buffer less at the step's peak) unless the model's head keeps them for its own backward."""
    if is_fused_head(model):
        return model(e["input_ids"], e["attention_mask"], e["targets"], op="ppo", old_logp=e["old_logp"],
                     advantages=e["adv"], mask=e["mask"], **kw)
    logits = lm_logits(model, e["input_ids"], e["attention_mask"])
    return rk.ppo_loss(logits[:, :-1], e["targets"], e["old_logp"], e["adv"], e["mask"],
                       overwrite_logits=logits_are_free_after_the_loss(model), **kw)  # fmt: skip


@torch.no_grad()
def minibatches(exp: dict, num_minibatches: int, epochs: int):
    """Yield ``epochs`` shuffled passes over an experience dict (tensors sharing dim 0), in ``num_minibatches`` parts."""
    B = exp["input_ids"].shape[0]
    mb = B // num_minibatches
    for _ in range(epochs):
        perm = torch.randperm(B, device=exp["input_ids"].device)
        for k in range(num_minibatches):
            idx = perm[k * mb:(k + 1) * mb]
            yield {key: v[idx] for key, v in exp.items()}


def gold_rewards(task, batch) -> torch.Tensor:
    return torch.tensor([task.gold_reward(p, r) for p, r in zip(batch["prompts"], batch["responses"])])


@torch.no_grad()
def evaluate_gold(model, tok, task, prompt_rows, sc: SamplingConfig, device, batch_size: int = 256,
                  max_len: int = 512) -> dict:
    """Mean gold reward (and EOS rate, mean length) of sampled responses on ``prompt_rows``."""
    golds, eos, lens = [], [], []
    for i in range(0, len(prompt_rows), batch_size):
        b = generate_responses(model, tok, prompt_rows[i:i + batch_size], sc, device, max_len)
        golds.append(gold_rewards(task, b))
        eos.append(b["has_eos"].float().cpu())
        lens.append(torch.tensor([len(r) for r in b["responses"]], dtype=torch.float))
    g = torch.cat(golds)
    return {"gold": g.mean().item(), "gold_std": g.std().item(), "eos_rate": torch.cat(eos).mean().item(),
            "mean_len": torch.cat(lens).mean().item(), "n": len(g)}
