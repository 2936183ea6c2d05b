"""GRPO: group-relative policy optimisation without a critic (Shao et al. 2024, DeepSeekMath),
with the loss-normalisation variants of Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025).

One step:
  1. take ``prompts_per_step`` prompts and sample ``num_generations`` responses for each;
  2. score every response: the task's gold function (``reward: gold``) or a reward model
     (``reward: rm``, minus an optional missing-EOS penalty);
  3. group-relative advantages, one per response, broadcast over its tokens::

        A_i = (r_i - mean_{group(i)} r) / (std + eps)
        std = std_{group(i)} r   (scale_rewards: group)  | std over the whole batch (batch) | 1 (none)

     (std is the unbiased sample std, as in the GRPO paper and TRL);
  4. ``ppo_epochs`` × ``minibatches`` of ``rk.ppo_loss`` with an asymmetric clip
     ``[1 - clip_low, 1 + clip_high]`` and, when ``beta > 0``, a k3 KL term to the frozen
     reference (the SFT policy) inside the loss.

``--fused-head``: old-policy / reference log-probs by ``rk.linear_logprobs`` and the loss by
``rk.linear_ppo_loss`` (same options), from the final hidden states and the LM head: no ``[B, T, V]``
logits (fused_head.py).

``loss_type`` picks the aggregation of the per-token terms (``rk.ppo_loss``'s ``loss_agg``):

    grpo     seq-mean-token-mean       mean over sequences of the per-sequence token mean
    bnpo     token-mean                Σ over all tokens / number of tokens
    dr_grpo  seq-mean-token-sum-norm   Σ over all tokens / (num sequences × max length)
    dapo     token-mean                as bnpo, and requires clip_high > clip_low ("clip-higher")

    python -m rlhf_kernels.trainer.cli grpo --sft runs/sft/final --reward gold --out_dir runs/grpo
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli grpo ...     # DDP, K ranks

Under ``torchrun`` each rank generates and scores its share of the step's prompts (whole groups),
the policy is wrapped in DDP, and every loss is normalised by *global* counts (tokens, non-empty
sequences, or sequences × max length, all-reduced) so that K ranks take the same update as one
process on the same global batch. ``scale_rewards: batch`` uses the all-reduced batch std.
Sampling is reseeded per (step, rank), so a resumed DDP run continues exactly. Rank 0 writes checkpoints.
``--parallel fsdp`` shards the policy, reference and reward model with FSDP2 instead (distributed.py).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, load_jsonl, shifted_targets, validate_rows
from .distributed import (
    all_reduce,
    all_reduce_mean_dict,
    barrier,
    clip_grad_norm,
    dist_setup,
    dist_world,
    global_loss_scale,
    wrap_model,
)
from .fused_head import FusedHeadLM
from .loop import run_steps
from .models import ScalarHeadModel, fit_max_len, load_policy
from .rollout import (
    SamplingConfig,
    evaluate_gold,
    generate_responses,
    gold_rewards,
    minibatches,
    policy_loss,
    sequence_logprobs,
)

LOSS_AGG = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
            "dapo": "token-mean"}
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(BaseConfig):
    out_dir: str = "runs/grpo"
    sft: str | None = None            # policy (and reference) init dir
    reward: str = "gold"              # gold (the task's program) | rm (a reward model, --rm DIR)
    rm: str | None = None
    data: str | None = None           # JSONL with a prompt column; None = the embedded task
    task: str = "letters"
    n_prompts: int = 4000
    steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 4          # responses per prompt (the group)
    ppo_epochs: int = 1               # passes over each rollout batch (μ in the GRPO paper)
    minibatches: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    # sampling
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    missing_eos_penalty: float | None = None
    # objective
    loss_type: str = "grpo"           # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"      # group | batch | none
    clip_low: float = 0.2
    clip_high: float | None = None    # None = clip_low (0.28 for dapo)
    beta: float = 0.0                 # k3 KL to the reference inside the loss; 0 = no KL term
    entropy_coef: float = 0.0
    # evaluation (tasks with a gold reward)
    eval_prompts: int = 256

    def validate(self):
        if self.loss_type not in LOSS_AGG:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_AGG)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {self.scale_rewards!r}")
        if self.reward not in ("gold", "rm"):
            raise ValueError(f"reward must be 'gold' or 'rm', got {self.reward!r}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages are relative to the group), "
                             f"got {self.num_generations}")
        if self.steps < 1 or self.prompts_per_step < 1 or self.ppo_epochs < 1:
            raise ValueError("steps, prompts_per_step and ppo_epochs must be >= 1")
        if (self.prompts_per_step * self.num_generations) % self.minibatches:
            raise ValueError(f"prompts_per_step × num_generations ({self.prompts_per_step * self.num_generations}) "
                             f"must be divisible by minibatches ({self.minibatches})")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0 < self.clip_low < 1 or self.clip_hi <= 0:
            raise ValueError(f"need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low}, {self.clip_high}")
        if self.loss_type == "dapo" and not self.clip_hi > self.clip_low:
            raise ValueError(f"loss_type 'dapo' needs clip_high > clip_low (clip-higher), "
                             f"got {self.clip_hi} <= {self.clip_low}")

    @property
    def clip_hi(self) -> float:
        if self.clip_high is not None:
            return self.clip_high
        return 0.28 if self.loss_type == "dapo" else self.clip_low

    @property
    def loss_agg(self) -> str:
        return LOSS_AGG[self.loss_type]

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.max_new_tokens)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """Advantages [N] for rewards [N] laid out as consecutive groups of ``num_generations``."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {list(SCALE_REWARDS)}, got {scale_rewards!r}")
    r = rewards.float().view(-1, num_generations)
    centered = r - r.mean(1, keepdim=True)
    if scale_rewards == "group":
        centered = centered / (r.std(1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centered = centered / (_batch_std(r) + eps)
    return centered.reshape(-1)


def _batch_std(r: torch.Tensor) -> torch.Tensor:
    """Unbiased std of all rewards, across ranks under DDP."""
    if dist_world() == 1:
        return r.std()
    x = r.reshape(-1).double()
    n, s, sq = all_reduce(torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()]))
    return ((sq - s * s / n) / (n - 1)).clamp(min=0).sqrt().float()


@torch.no_grad()
def make_group_experience(cfg, policy, ref, rm, tok, rows, dev, task=None):
    """Rollout (each prompt ``num_generations`` times), scoring, group advantages."""
    G = cfg.num_generations
    rep = [r for r in rows for _ in range(G)]   # groups are consecutive rows
    roll = generate_responses(policy, tok, rep, cfg.sampling(), dev, cfg.max_len)
    ids, attn = roll["input_ids"], roll["attention_mask"]
    mask = roll["loss_mask"][:, 1:].float()
    old_logp = sequence_logprobs(policy, roll, cfg.temperature, cfg.backend)
    ref_logp = sequence_logprobs(ref, roll, cfg.temperature, cfg.backend)
    gold = gold_rewards(task, roll).to(dev) if task is not None else None
    if cfg.reward == "gold":
        reward = gold.clone()
    else:
        reward = rm.score(ids, attn)
    if cfg.missing_eos_penalty is not None:
        reward = reward - cfg.missing_eos_penalty * (~roll["has_eos"]).float()
    adv = group_advantages(reward, G, cfg.scale_rewards)
    exp = {"input_ids": ids, "attention_mask": attn, "targets": shifted_targets(ids, roll["loss_mask"]),
           "mask": mask, "old_logp": old_logp, "ref_logp": ref_logp, "adv": adv.unsqueeze(1) * mask}
    std = reward.view(-1, G).std(1)
    stats = {"reward": reward.mean().item(), "reward_std": reward.std().item(),
             "frac_zero_std": (std < 1e-6).float().mean().item(),   # groups that give no signal
             "kl": ((old_logp - ref_logp) * mask).sum(1).mean().item(),   # k1, nats per sequence
             "resp_len": mask.sum(1).mean().item(), "eos_rate": roll["has_eos"].float().mean().item()}
    if gold is not None:
        stats["gold"] = gold.mean().item()
    return exp, stats


def grpo_update(cfg, policy, opt, exp):
    agg = {"pg_loss": 0.0, "entropy": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "grad_norm": 0.0}
    n = 0
    bk = {} if cfg.backend is None else {"backend": cfg.backend}
    for e in minibatches(exp, cfg.minibatches, cfg.ppo_epochs):
        out = policy_loss(policy, e, ref_logp=e["ref_logp"] if cfg.beta > 0 else None, kl_coef=cfg.beta,
                          kl_estimator="k3", entropy_coef=cfg.entropy_coef, clip_low=cfg.clip_low,
                          clip_high=cfg.clip_hi, temperature=cfg.temperature, loss_agg=cfg.loss_agg, **bk)
        loss = out.loss * global_loss_scale(cfg.loss_agg, e["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = clip_grad_norm(policy.parameters(), cfg.grad_clip)
        opt.step()
        m = e["mask"]
        agg["pg_loss"] += loss.item()
        agg["entropy"] += ((out.entropy * m).sum() / m.sum().clamp(min=1)).item()
        agg["clip_frac"] += float(out.clip_frac)
        agg["approx_kl"] += float(out.approx_kl)
        agg["grad_norm"] += gn
        n += 1
    return all_reduce_mean_dict({k: v / n for k, v in agg.items()}, exp["mask"].device)


def train_grpo(cfg: GRPOConfig, policy=None, tok=None, rm=None, prompts=None, task=None):
    """Returns (policy, tokenizer, history, summary). ``policy``/``rm`` override cfg.sft/cfg.rm."""
    seed_all(cfg.seed, cfg.threads)
    rank, world, dev = dist_setup(cfg.device)
    if rank > 0:  # rank 0 logs
        cfg = dataclasses.replace(cfg, progress=False, log_every=0)
    if cfg.prompts_per_step % world or (cfg.prompts_per_step // world * cfg.num_generations) % cfg.minibatches:
        raise ValueError(f"prompts_per_step ({cfg.prompts_per_step}) must be divisible by the number of ranks ({world}), "
                         f"and each rank's responses by minibatches ({cfg.minibatches})")
    if policy is None:
        if not cfg.sft:
            raise ValueError("grpo needs an SFT policy: set --sft <dir> (e.g. runs/sft/final)")
        policy, tok = load_policy(cfg.sft)
    if cfg.reward == "rm" and rm is None:
        if not cfg.rm:
            raise ValueError("reward 'rm' needs a reward model: set --rm <dir> (or --reward gold)")
        rm = ScalarHeadModel.from_pretrained(cfg.rm)
    cfg = fit_max_len(cfg, policy, rm)  # rm: None under reward 'gold'
    if task is None and (not cfg.data or cfg.reward == "gold"):
        from ..tasks import get_task
        task = get_task(cfg.task)
    if prompts is None:
        prompts = load_jsonl(cfg.data, "ppo") if cfg.data else task.prompts(cfg.n_prompts, cfg.seed)
    prompts = validate_rows(prompts, "ppo")
    policy.to(dev).train()
    actor = FusedHeadLM(policy) if cfg.fused_head else policy   # generates, scores, is wrapped and saved
    ref = wrap_model(copy.deepcopy(actor).eval().requires_grad_(False), cfg.parallel, dev)
    model = wrap_model(actor, cfg.parallel, dev)   # DDP wrapper, or `actor` itself sharded by FSDP2
    if rm is not None:
        rm = wrap_model(rm.to(dev).eval().requires_grad_(False), cfg.parallel, dev)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(cfg.warmup_steps, 1), cfg.steps, 1.0))
    eval_rows = task.prompts(cfg.eval_prompts, cfg.seed + 10_000) if task is not None and cfg.eval_prompts else None

    def evaluate(model):
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed + 1)
            return evaluate_gold(model, tok, task, eval_rows, cfg.sampling(), dev, max_len=cfg.max_len)

    def save(step):  # every rank: FSDP2 gathers the shards, rank 0 writes
        save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched},
                        {"history": history, "summary": summary}, tok)

    step, history, summary = 0, [], {}
    if cfg.resume and (ck := latest_checkpoint(cfg.out_dir)):
        step, extra = load_checkpoint(ck, {"policy": actor}, {"policy": opt}, {"policy": sched})
        history, summary = extra["history"], extra.get("summary", {})
    elif eval_rows:
        summary["sft_eval"] = evaluate(ref)

    def train_step(step):
        t0 = time.perf_counter()
        # Per-(step, rank) sampling streams: ranks differ, a resumed run continues exactly, and a run does not depend on
        # what drew from the global stream before it (a reward model loaded from --rm initialises a head it then
        # overwrites, one passed in does not: the demo's PPO came out at 0.594 or 0.868 from the same weights).
        torch.manual_seed((cfg.seed * 1_000_003 + step) * 1009 + rank)
        rows = [prompts[i] for i in batches(len(prompts), cfg.prompts_per_step, cfg.seed, step)[rank::world]]
        exp, stats = make_group_experience(cfg, actor, ref, rm, tok, rows, dev, task)
        stats = all_reduce_mean_dict(stats, dev)
        t1 = time.perf_counter()
        upd = grpo_update(cfg, model, opt, exp)
        sched.step()
        tokens = exp["attention_mask"].numel() * world * (1 + 2 + cfg.ppo_epochs * 2)  # generation, scoring, training
        return {**stats, **upd, "rollout_s": t1 - t0}, tokens

    step, finished = run_steps(cfg, "grpo", "grpo", step, dev, history, train_step, save)
    if not finished:
        return policy, tok, history, summary
    if eval_rows:
        summary["grpo_eval"] = evaluate(actor)
    summary["final_kl"] = history[-1]["kl"] if history else float("nan")
    save(step)
    save_model(actor, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return policy, tok, history, summary


def main(argv: list[str]) -> int:
    """``rlhf-kernels grpo [--config FILE] [--key value ...]`` (called by trainer/cli.py)."""
    from .cli import run_stage

    code, cfg, result = run_stage("grpo", GRPOConfig, train_grpo, argv)
    if result is None:
        return code
    summary = result[3]
    if int(os.environ.get("RANK", "0")) > 0:
        return 0
    if "grpo_eval" in summary:
        print(f"gold reward: SFT {summary['sft_eval']['gold']:.3f} -> GRPO {summary['grpo_eval']['gold']:.3f}; "
              f"final KL {summary['final_kl']:.2f} nats/seq")
    print(f"saved -> {cfg.out_dir}/final")
    return 0
