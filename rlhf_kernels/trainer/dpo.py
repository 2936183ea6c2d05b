"""DPO and relatives on preference pairs with a frozen reference (Rafailov et al. 2023;
IPO: Azar et al. 2023; hinge / SLiC: Zhao et al. 2023; conservative DPO label smoothing).

Sequence log-probs are sums of ``rk.logprobs`` over response tokens (EOS included)::

    π_c = Σ_t log π(y_c,t | x, y_c,<t)       (the same for π_r, ref_c, ref_r; ref = the SFT model)
    h   = (π_c - π_r) - (ref_c - ref_r)
    sigmoid: -(1-ε)·logσ(β·h) - ε·logσ(-β·h)     ipo: (h - 1/(2β))²     hinge: relu(1 - β·h)

``--fused-head``: the policy and reference log-probs by ``rk.linear_logprobs`` from the final hidden
states and the LM head, never building the ``[2B, T, V]`` logits (fused_head.py).

Logged: the implicit rewards β·(π - ref) of chosen and rejected, their margin, and the
preference accuracy (chosen implicit reward > rejected; a tie counts half), on the batch and on held-out pairs.
Pairs come from the embedded task's simulated annotator or a JSONL file (prompt/chosen/rejected).

    python -m rlhf_kernels.trainer.cli dpo --sft runs/sft/final --out_dir runs/dpo
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli dpo ...     # DDP, K ranks

Under ``torchrun`` every step's ``batch_size`` pairs are split evenly across ranks and the policy
is wrapped in DDP; the loss is a mean over pairs, so DDP's gradient average gives exactly the
single-process update on the same global batch. Rank 0 writes checkpoints. ``--parallel fsdp``
shards the policy and the reference with FSDP2 instead (distributed.py).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, collate_pairs, load_jsonl, shifted_targets, validate_rows
from .distributed import all_reduce, all_reduce_mean_dict, barrier, clip_grad_norm, dist_setup, wrap_model
from .fused_head import FusedHeadLM, is_fused_head
from .loop import run_steps
from .models import fit_max_len, lm_logits, load_policy, logits_are_free_after_the_loss
from .rollout import SamplingConfig, evaluate_gold, generate_responses, sequence_logprobs

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(BaseConfig):
    out_dir: str = "runs/dpo"
    sft: str | None = None            # policy init and frozen reference
    data: str | None = None           # JSONL with prompt/chosen/rejected; None = the embedded task
    eval_data: str | None = None      # held-out pairs; None = split off eval_frac
    task: str = "letters"
    n_train: int = 4000               # embedded-task pairs
    eval_frac: float = 0.1
    steps: int = 200
    batch_size: int = 32              # pairs per step
    lr: float = 1e-4
    warmup_steps: int = 10
    beta: float = 0.1
    loss_type: str = "sigmoid"        # sigmoid | ipo | hinge
    label_smoothing: float = 0.0      # ε, sigmoid only
    # evaluation of sampled responses (tasks with a gold reward)
    eval_prompts: int = 256
    temperature: float = 1.0
    max_new_tokens: int = 16

    def validate(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {self.loss_type!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.eval_frac < 1.0:
            raise ValueError(f"eval_frac must be in [0, 1), got {self.eval_frac}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, 0, 1.0, self.max_new_tokens)


def pair_logps(model, batch, backend=None):
    """Sequence log-probs (sum over response tokens) of the chosen [B] and rejected [B] halves; from the
    logits, or for a ``FusedHeadLM`` (DDP-wrapped or not) ``rk.linear_logprobs`` inside its forward."""
    targets = shifted_targets(batch["input_ids"], batch["loss_mask"])
    if is_fused_head(model):
        logp = model(batch["input_ids"], batch["attention_mask"], targets, backend=backend)
    else:
        logits = lm_logits(model, batch["input_ids"], batch["attention_mask"])
        logp = rk.logprobs(logits[:, :-1], targets, backend=backend,
                           overwrite_logits=logits_are_free_after_the_loss(model))  # the logits serve nothing else
    s = logp.sum(-1)
    B = s.shape[0] // 2
    return s[:B], s[B:]


def dpo_stats(pc, pr, rc, rr, beta) -> dict:
    """Implicit rewards β·(π - ref), their margin and the preference accuracy."""
    with torch.no_grad():
        ch, rj = beta * (pc - rc), beta * (pr - rr)
        return {"reward_chosen": ch.mean().item(), "reward_rejected": rj.mean().item(),
                "margin": (ch - rj).mean().item(), "acc": ((ch > rj).float() + 0.5 * (ch == rj).float()).mean().item()}  # a tie counts half


@torch.no_grad()
def pair_eval(policy, ref, tok, rows, cfg, dev, batch_size=256) -> dict:
    was = policy.training
    policy.eval()
    out = {"reward_chosen": 0.0, "reward_rejected": 0.0, "margin": 0.0, "acc": 0.0}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        b = {k: v.to(dev) for k, v in collate_pairs(chunk, tok, cfg.max_len).items()}
        s = dpo_stats(*pair_logps(policy, b, cfg.backend), *pair_logps(ref, b, cfg.backend), cfg.beta)
        for k in out:
            out[k] += s[k] * len(chunk)
    policy.train(was)
    return {k: v / len(rows) for k, v in out.items()}


@torch.no_grad()
def sampled_kl(policy, ref, tok, rows, sc: SamplingConfig, dev, max_len, backend=None, batch_size=256) -> float:
    """KL(π ‖ ref) in nats per sequence, k1 on responses sampled from π."""
    tot = 0.0
    for i in range(0, len(rows), batch_size):
        roll = generate_responses(policy, tok, rows[i:i + batch_size], sc, dev, max_len)
        d = sequence_logprobs(policy, roll, sc.temperature, backend) - sequence_logprobs(ref, roll, sc.temperature, backend)
        tot += d.sum().item()
    return tot / len(rows)


def train_dpo(cfg: DPOConfig, policy=None, tok=None, rows=None, eval_rows=None, task=None):
    """Returns (policy, tokenizer, history, summary). ``policy`` overrides cfg.sft; ``rows`` the pairs."""
    seed_all(cfg.seed, cfg.threads)
    rank, world, dev = dist_setup(cfg.device)
    if rank > 0:  # rank 0 logs
        cfg = dataclasses.replace(cfg, progress=False, log_every=0)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    if policy is None:
        if not cfg.sft:
            raise ValueError("dpo needs an SFT policy (also the reference): set --sft <dir> (e.g. runs/sft/final)")
        policy, tok = load_policy(cfg.sft)
    cfg = fit_max_len(cfg, policy)
    if task is None and not cfg.data:
        from ..tasks import get_task
        task = get_task(cfg.task)
    if rows is None:
        rows = load_jsonl(cfg.data, "rm") if cfg.data else task.preference_data(cfg.n_train, cfg.seed)
    rows = validate_rows(rows, "rm")
    if eval_rows is None:
        if cfg.eval_data:
            eval_rows = load_jsonl(cfg.eval_data, "rm")
        elif cfg.eval_frac > 0:
            k = max(1, int(len(rows) * cfg.eval_frac))
            rows, eval_rows = rows[:-k], rows[-k:]
    policy.to(dev).train()
    actor = FusedHeadLM(policy) if cfg.fused_head else policy   # scores, generates, is wrapped and saved
    ref = wrap_model(copy.deepcopy(actor).eval().requires_grad_(False), cfg.parallel, dev)
    model = wrap_model(actor, cfg.parallel, dev)   # DDP wrapper, or `actor` itself sharded by FSDP2
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max(cfg.warmup_steps, 1), cfg.steps, 1.0))
    prompts = task.prompts(cfg.eval_prompts, cfg.seed + 10_000) if task is not None and cfg.eval_prompts else None

    def evaluate(model):
        out = {}
        if eval_rows:
            out["pairs"] = pair_eval(model, ref, tok, eval_rows, cfg, dev)
        if prompts:
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                torch.manual_seed(cfg.seed + 1)
                out.update(evaluate_gold(model, tok, task, prompts, cfg.sampling(), dev, max_len=cfg.max_len))
                out["kl"] = sampled_kl(model, ref, tok, prompts, cfg.sampling(), dev, cfg.max_len, cfg.backend)
        return out

    def save(step):  # every rank: FSDP2 gathers the shards, rank 0 writes
        save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched},
                        {"history": history, "summary": summary}, tok)

    step, history, summary = 0, [], {}
    if cfg.resume and (ck := latest_checkpoint(cfg.out_dir)):
        step, extra = load_checkpoint(ck, {"policy": actor}, {"policy": opt}, {"policy": sched})
        history, summary = extra["history"], extra.get("summary", {})
    else:
        summary["sft_eval"] = evaluate(ref)

    def train_step(step):
        idx = batches(len(rows), cfg.batch_size, cfg.seed, step)[rank::world]   # this rank's share
        b = collate_pairs([rows[i] for i in idx], tok, cfg.max_len)
        b = {k: v.to(dev) for k, v in b.items()}
        pc, pr = pair_logps(model, b, cfg.backend)
        with torch.no_grad():
            rc, rr = pair_logps(ref, b, cfg.backend)
        loss = rk.dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type,
                           label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = clip_grad_norm(policy.parameters(), cfg.grad_clip)
        opt.step()
        lr = sched.get_last_lr()[0]   # the rate this step used (after sched.step(), the next step's)
        sched.step()
        stats = all_reduce_mean_dict({"loss": loss.item(), **dpo_stats(pc, pr, rc, rr, cfg.beta)}, dev)
        fields = {**stats, "grad_norm": float(gn), "lr": lr}
        return fields, all_reduce(b["attention_mask"].sum()).item() * 2  # policy + reference passes

    step, finished = run_steps(cfg, "dpo", "dpo", step, dev, history, train_step, save)
    if not finished:
        return policy, tok, history, summary
    summary["dpo_eval"] = evaluate(actor)
    summary["final_kl"] = summary["dpo_eval"].get("kl", float("nan"))
    save(step)
    save_model(actor, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return policy, tok, history, summary


def main(argv: list[str]) -> int:
    """``rlhf-kernels dpo [--config FILE] [--key value ...]`` (called by trainer/cli.py)."""
    from .cli import run_stage

    code, cfg, result = run_stage("dpo", DPOConfig, train_dpo, argv)
    if result is None:
        return code
    summary = result[3]
    if int(os.environ.get("RANK", "0")) > 0:
        return 0
    ev = summary.get("dpo_eval", {})
    if "pairs" in ev:
        print(f"held-out preference accuracy: {summary['sft_eval']['pairs']['acc']:.3f} -> {ev['pairs']['acc']:.3f}; "
              f"margin {ev['pairs']['margin']:.3f}")
    if "gold" in ev:
        print(f"gold reward: SFT {summary['sft_eval']['gold']:.3f} -> DPO {ev['gold']:.3f}; KL {ev['kl']:.2f} nats/seq")
    print(f"saved -> {cfg.out_dir}/final")
    return 0
