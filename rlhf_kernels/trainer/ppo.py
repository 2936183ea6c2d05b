"""PPO against a learned reward model with a KL penalty to the frozen SFT policy
(InstructGPT, Ouyang et al. 2022; the per-token KL-in-reward form of Ziegler et al. 2019).

One step:
  1. sample responses for a batch of prompts (``generate``: temperature, top-k, top-p, EOS);
  2. old-policy and reference log-probs through the fused op, values from the critic, the
     reward model's score at the last response token (minus an optional missing-EOS penalty);
  3. per-token rewards  r_t = -β·k(logp_t, ref_t)  (+ score on the last token) when the KL is
     in the reward, otherwise the KL is a loss term inside ``rk.ppo_loss``;
  4. ``rk.gae`` → advantages (whitened) and returns;
  5. ``ppo_epochs`` × ``minibatches`` of ``rk.ppo_loss`` for the policy and clipped
     ``rk.value_loss`` for the critic, with gradient clipping;
  6. optionally adapt β toward a KL target (Ziegler et al.).

``--fused-head``: steps 2 and 5 run on the final hidden states and the LM head instead of the
``[B, T, V]`` logits (``rk.linear_logprobs`` for the old-policy / reference log-probs,
``rk.linear_ppo_loss`` with the same options for the policy loss; fused_head.py); sampling, the
critic and the reward model are unchanged.

    python -m rlhf_kernels.trainer.cli ppo --sft runs/sft/final --rm runs/rm/final --out_dir runs/ppo
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli ppo ...                      # DDP, K ranks
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli ppo ... --parallel fsdp      # FSDP2

Under ``torchrun`` each rank generates and scores ``rollout_batch / K`` of the step's prompts,
advantages are whitened with the all-reduced mean and variance, and the policy and the critic
(wrapped in DDP, or sharded with the reference and reward model by FSDP2) normalise their losses by
global counts (distributed.py), so K ranks take the same update as one process on the same global
batch. Sampling is reseeded per (step, rank), so a resumed run continues exactly. Checkpoints are
written by rank 0 (gathered from the shards under FSDP2) and read by every rank.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, load_jsonl, shifted_targets, validate_rows
from .distributed import (
    all_reduce,
    all_reduce_mean_dict,
    barrier,
    clip_grad_norm,
    dist_setup,
    global_loss_scale,
    wrap_model,
)
from .fused_head import FusedHeadLM
from .loop import run_steps
from .models import ScalarHeadModel, fit_max_len, last_index, load_policy
from .rollout import (
    SamplingConfig,
    evaluate_gold,
    generate_responses,
    gold_rewards,
    minibatches,
    policy_loss,
    sequence_logprobs,
)


@dataclass
class PPOConfig(BaseConfig):
    out_dir: str = "runs/ppo"
    sft: str | None = None            # policy (and reference) init dir
    rm: str | None = None             # reward model dir; the critic starts from it
    data: str | None = None           # JSONL with a prompt column; None = the embedded task
    task: str = "letters"
    n_prompts: int = 4000
    steps: int = 100
    rollout_batch: int = 64           # prompts per step
    ppo_epochs: int = 4
    minibatches: int = 2
    lr: float = 3e-4
    critic_lr: float = 1e-3
    warmup_steps: int = 0
    # sampling
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    missing_eos_penalty: float | None = None
    # KL to the reference policy
    kl_coef: float = 0.05
    kl_in_reward: bool = True         # True: per-token penalty in the reward; False: loss term
    kl_estimator: str = "k1"          # reward: k1 | k3; loss: k1 | k2 | k3
    adaptive_kl: bool = False
    kl_target: float = 1.0            # nats per sequence
    kl_horizon: int = 1000
    # losses
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip: float = 0.2
    value_clip: float | None = 0.2
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    # evaluation (tasks with a gold reward)
    eval_prompts: int = 256

    def validate(self):
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator must be k1, k2 or k3, got {self.kl_estimator!r}")
        if self.kl_in_reward and self.kl_estimator == "k2":
            raise ValueError("kl_estimator 'k2' is only valid as a loss term (kl_in_reward false)")
        if self.rollout_batch % self.minibatches:
            raise ValueError(f"rollout_batch ({self.rollout_batch}) must be divisible by minibatches "
                             f"({self.minibatches})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm"):
            raise ValueError(f"unknown loss_agg {self.loss_agg!r}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.max_new_tokens)


def masked_whiten(x, mask, eps=1e-8):
    """``(x - mean) / std`` over the masked entries of every rank (all-reduced sums), 0 elsewhere."""
    m = mask.float()
    n = all_reduce(m.sum()).clamp(min=1)
    mean = all_reduce((x * m).sum()) / n
    var = all_reduce((((x - mean) * m) ** 2).sum()) / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def adapted_kl_coef(kl_coef: float, kl: float, cfg: PPOConfig) -> float:
    """Ziegler et al. (2019)'s proportional controller: the KL coefficient β for the next step from this step's
    KL (nats per sequence), ``β·(1 + clip(KL / kl_target - 1, -0.2, 0.2)·rollout_batch / kl_horizon)``."""
    error = max(-0.2, min(0.2, kl / cfg.kl_target - 1.0))
    return kl_coef * (1.0 + error * cfg.rollout_batch / cfg.kl_horizon)


@torch.no_grad()
def make_experience(cfg, policy, ref, critic, rm, tok, rows, kl_coef, dev, task=None):
    """Rollout + scoring + GAE. Returns a dict of [B, T-1] tensors aligned with logits[:, :-1]."""
    roll = generate_responses(policy, tok, rows, cfg.sampling(), dev, cfg.max_len)
    ids, attn = roll["input_ids"], roll["attention_mask"]
    mask = roll["loss_mask"][:, 1:].float()
    old_logp = sequence_logprobs(policy, roll, cfg.temperature, cfg.backend)
    ref_logp = sequence_logprobs(ref, roll, cfg.temperature, cfg.backend)
    values = critic(ids, attn)[:, :-1] * mask
    score = rm.score(ids, attn)
    if cfg.missing_eos_penalty is not None:
        score = score - cfg.missing_eos_penalty * (~roll["has_eos"]).float()
    bk = {} if cfg.backend is None else {"backend": cfg.backend}
    kl_tok = rk.kl_estimate(old_logp, ref_logp, estimator=cfg.kl_estimator if cfg.kl_in_reward else "k1", **bk) * mask
    rewards = -kl_coef * kl_tok if cfg.kl_in_reward else torch.zeros_like(mask)
    rewards = rewards.scatter_add(1, last_index(mask).unsqueeze(1), score.unsqueeze(1))
    adv, ret = rk.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam, **bk)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    exp = {"input_ids": ids, "attention_mask": attn, "targets": shifted_targets(ids, roll["loss_mask"]),
           "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp, "values": values, "adv": adv,
           "returns": ret}
    stats = {"proxy": score.mean().item(),
             "kl": ((old_logp - ref_logp) * mask).sum(1).mean().item(),   # k1, nats per sequence
             "resp_len": mask.sum(1).mean().item(), "eos_rate": roll["has_eos"].float().mean().item()}
    if task is not None:
        stats["gold"] = gold_rewards(task, roll).mean().item()
    return exp, stats


def ppo_update(cfg, policy, critic, opt, copt, exp, kl_coef):
    agg = {"pg_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
    n = 0
    bk = {} if cfg.backend is None else {"backend": cfg.backend}
    for e in minibatches(exp, cfg.minibatches, cfg.ppo_epochs):
        out = policy_loss(policy, e, ref_logp=None if cfg.kl_in_reward else e["ref_logp"],
                          kl_coef=0.0 if cfg.kl_in_reward else kl_coef, kl_estimator=cfg.kl_estimator,
                          entropy_coef=cfg.entropy_coef, clip_low=cfg.clip, clip_high=cfg.clip,
                          temperature=cfg.temperature, loss_agg=cfg.loss_agg, **bk)
        scale = global_loss_scale(cfg.loss_agg, e["mask"])   # 1 in one process
        loss = out.loss * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(policy.parameters(), cfg.grad_clip)
        opt.step()
        v = critic(e["input_ids"], e["attention_mask"])[:, :-1]
        vl = rk.value_loss(v, e["values"], e["returns"], e["mask"], clip=cfg.value_clip, loss_agg=cfg.loss_agg) * scale
        copt.zero_grad(set_to_none=True)
        vl.backward()
        clip_grad_norm(critic.parameters(), cfg.grad_clip)
        copt.step()
        m = e["mask"]
        agg["pg_loss"] += loss.item()
        agg["value_loss"] += vl.item()
        agg["entropy"] += ((out.entropy * m).sum() / m.sum().clamp(min=1)).item()
        agg["clip_frac"] += float(out.clip_frac)
        agg["approx_kl"] += float(out.approx_kl)
        n += 1
    # averaged over ranks: the scaled losses give the global loss, the other stats a mean of rank means
    return all_reduce_mean_dict({k: v / n for k, v in agg.items()}, exp["mask"].device)


def train_ppo(cfg: PPOConfig, policy=None, tok=None, rm=None, prompts=None, task=None):
    """Returns (policy, tokenizer, history, summary). ``policy``/``rm`` override cfg.sft/cfg.rm."""
    seed_all(cfg.seed, cfg.threads)
    rank, world, dev = dist_setup(cfg.device)
    if rank > 0:  # rank 0 logs
        cfg = dataclasses.replace(cfg, progress=False, log_every=0)
    if cfg.rollout_batch % (world * cfg.minibatches):
        raise ValueError(f"rollout_batch ({cfg.rollout_batch}) must be divisible by ranks × minibatches "
                         f"({world} × {cfg.minibatches})")
    if policy is None:
        if not cfg.sft:
            raise ValueError("ppo needs an SFT policy: set --sft <dir> (e.g. runs/sft/final)")
        policy, tok = load_policy(cfg.sft)
    if rm is None:
        if not cfg.rm:
            raise ValueError("ppo needs a reward model: set --rm <dir> (e.g. runs/rm/final)")
        rm = ScalarHeadModel.from_pretrained(cfg.rm)
    cfg = fit_max_len(cfg, policy, rm)  # prompt + response <= max_len: both read whole sequences
    if task is None and not cfg.data:
        from ..tasks import get_task
        task = get_task(cfg.task)
    if prompts is None:
        prompts = load_jsonl(cfg.data, "ppo") if cfg.data else task.prompts(cfg.n_prompts, cfg.seed)
    prompts = validate_rows(prompts, "ppo")
    policy.to(dev).train()
    # actor: what generates, scores, is wrapped and checkpointed: the HF model, or with --fused-head the
    # FusedHeadLM around it (its forward gives log-probs / the loss, never logits); `policy` stays the HF model
    actor = FusedHeadLM(policy) if cfg.fused_head else policy
    ref = copy.deepcopy(actor).eval().requires_grad_(False)
    rm = rm.to(dev).eval().requires_grad_(False)
    critic = copy.deepcopy(rm).train().requires_grad_(True)
    # DDP: wrappers for the two trained models; FSDP2: all four sharded in place (model is actor, vmodel critic)
    ref, rm = wrap_model(ref, cfg.parallel, dev), wrap_model(rm, cfg.parallel, dev)
    model, vmodel = wrap_model(actor, cfg.parallel, dev), wrap_model(critic, cfg.parallel, dev)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    copt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(cfg.warmup_steps, 1), cfg.steps, 1.0))
    eval_rows = task.prompts(cfg.eval_prompts, cfg.seed + 10_000) if task is not None and cfg.eval_prompts else None

    def evaluate(model):
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            return evaluate_gold(model, tok, task, eval_rows, cfg.sampling(), dev, max_len=cfg.max_len)

    def save(step):  # every rank: FSDP2 gathers the shards, rank 0 writes
        save_checkpoint(cfg.out_dir, step, {"policy": actor, "critic": critic}, {"policy": opt, "critic": copt},
                        {"policy": sched}, {"history": history, "kl_coef": kl_coef, "summary": summary}, tok)

    step, history, kl_coef, summary = 0, [], cfg.kl_coef, {}
    if cfg.resume and (ck := latest_checkpoint(cfg.out_dir)):
        step, extra = load_checkpoint(ck, {"policy": actor, "critic": critic}, {"policy": opt, "critic": copt},
                                      {"policy": sched})
        history, kl_coef, summary = extra["history"], extra["kl_coef"], extra.get("summary", {})
    elif eval_rows:
        summary["sft_eval"] = evaluate(ref)

    def train_step(step):
        nonlocal kl_coef
        t0 = time.perf_counter()
        # Per-(step, rank) sampling streams: ranks differ, a resumed run continues exactly, and a run does not depend on
        # what drew from the global stream before it (a reward model loaded from --rm initialises a head it then
        # overwrites, one passed in does not: the demo's PPO came out at 0.594 or 0.868 from the same weights).
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + rank)
        rows = [prompts[i] for i in batches(len(prompts), cfg.rollout_batch, cfg.seed, step)[rank::world]]
        exp, stats = make_experience(cfg, actor, ref, critic, rm, tok, rows, kl_coef, dev, task)
        stats = all_reduce_mean_dict(stats, dev)   # equal shares: the mean of rank means is the global mean
        t1 = time.perf_counter()
        upd = ppo_update(cfg, model, vmodel, opt, copt, exp, kl_coef)
        sched.step()
        if cfg.adaptive_kl:
            kl_coef = adapted_kl_coef(kl_coef, stats["kl"], cfg)
        fields = {**stats, **upd, "kl_coef": kl_coef, "rollout_s": t1 - t0}  # the coefficient the next step uses
        # generation and scoring passes, then the training passes
        return fields, exp["attention_mask"].numel() * world * (1 + 2 + cfg.ppo_epochs * 2)

    step, finished = run_steps(cfg, "ppo", "ppo", step, dev, history, train_step, save)
    if not finished:
        return policy, tok, history, summary
    if eval_rows:
        summary["ppo_eval"] = evaluate(actor)
    summary["final_kl"] = history[-1]["kl"] if history else float("nan")
    save(step)
    save_model(actor, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return policy, tok, history, summary
