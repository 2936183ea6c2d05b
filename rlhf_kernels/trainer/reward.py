"""Reward model: Bradley-Terry  -log σ(r(x, y_c) - r(x, y_r) - margin)  (+ optional centering),
through ``rk.reward_model_loss``; held-out pairwise accuracy reported.

The reward model is the LM body (initialised from the SFT policy) plus a scalar head read at
the last non-pad token.

    python -m rlhf_kernels.trainer.cli rm --data pairs.jsonl --init runs/sft/final --out_dir runs/rm
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli rm ... [--parallel fsdp]

Under ``torchrun`` every step's pairs are split evenly across ranks; the loss is a mean over pairs,
so the gradient average of DDP / FSDP2 gives the single-process update (distributed.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, collate_pairs, load_jsonl, validate_rows
from .distributed import all_reduce, all_reduce_mean_dict, barrier, clip_grad_norm, dist_setup, wrap_model
from .loop import run_steps
from .models import ScalarHeadModel, build_policy, fit_max_len, last_index, load_policy


@dataclass
class RMConfig(BaseConfig):
    out_dir: str = "runs/rm"
    data: str | None = None       # JSONL with prompt/chosen/rejected; None = the embedded task
    eval_data: str | None = None  # held-out pairs; None = split off eval_frac
    init: str | None = None       # policy dir to initialise the body from (e.g. runs/sft/final)
    task: str = "letters"
    n_train: int = 4000
    eval_frac: float = 0.1
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    margin: float | None = None
    center_coef: float = 0.0

    def validate(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.eval_frac < 1.0:
            raise ValueError(f"eval_frac must be in [0, 1), got {self.eval_frac}")


def rm_forward(rm, batch):
    """Rewards of the chosen [B] and rejected [B] halves of a pair batch (``rm.score`` through ``rm``'s
    forward, so that a DDP wrapper sees the call)."""
    v = rm(batch["input_ids"], batch["attention_mask"])
    r = v.gather(1, last_index(batch["attention_mask"]).unsqueeze(1)).squeeze(1)
    B = r.shape[0] // 2
    return r[:B], r[B:]


@torch.no_grad()
def rm_accuracy(rm, tok, rows, device, batch_size=256, max_len=512) -> float:
    was = rm.training
    rm.eval()
    correct = 0
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in collate_pairs(rows[i:i + batch_size], tok, max_len).items()}
        rc, rr = rm_forward(rm, b)
        correct += (rc > rr).sum().item()
    rm.train(was)
    return correct / max(len(rows), 1)


def train_rm(cfg: RMConfig, rm=None, tok=None, rows=None, eval_rows=None):
    """Returns (reward_model, tokenizer, history, eval_accuracy)."""
    seed_all(cfg.seed, cfg.threads)
    rank, world, dev = dist_setup(cfg.device)
    if rank > 0:  # rank 0 logs
        cfg = dataclasses.replace(cfg, progress=False, log_every=0)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    if rm is None:
        if cfg.init:
            lm, tok = load_policy(cfg.init)
        else:
            lm, tok = build_policy(cfg.model_config())
        rm = ScalarHeadModel.from_causal_lm(lm)
        del lm
    cfg = fit_max_len(cfg, rm)
    rm.to(dev).train()
    wrapped = wrap_model(rm, cfg.parallel, dev)   # DDP wrapper, or `rm` itself sharded by FSDP2
    if rows is None:
        if cfg.data:
            rows = load_jsonl(cfg.data, "rm")
        else:
            from ..tasks import get_task
            rows = get_task(cfg.task).preference_data(cfg.n_train, cfg.seed)
    rows = validate_rows(rows, "rm")
    if eval_rows is None:
        if cfg.eval_data:
            eval_rows = load_jsonl(cfg.eval_data, "rm")
        else:
            n_eval = int(len(rows) * cfg.eval_frac)
            rows, eval_rows = rows[:len(rows) - n_eval], rows[len(rows) - n_eval:]
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    step, history = 0, []
    if cfg.resume and (ck := latest_checkpoint(cfg.out_dir)):
        step, extra = load_checkpoint(ck, {"rm": rm}, {"rm": opt}, {"rm": sched})
        history = extra.get("history", [])

    def train_step(step):
        idx = batches(len(rows), cfg.batch_size, cfg.seed, step)[rank::world]   # this rank's share
        b = {k: v.to(dev) for k, v in collate_pairs([rows[i] for i in idx], tok, cfg.max_len).items()}
        rc, rr = rm_forward(wrapped, b)
        loss = rk.reward_model_loss(rc, rr, margin=cfg.margin, center_coef=cfg.center_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = clip_grad_norm(rm.parameters(), cfg.grad_clip)
        opt.step()
        lr = sched.get_last_lr()[0]   # the rate this step used (after sched.step(), the next step's)
        sched.step()
        stats = all_reduce_mean_dict({"loss": loss.item(), "acc": (rc > rr).float().mean().item(),
                                      "margin": (rc - rr).mean().item()}, dev)   # equal shares: global means
        fields = {**stats, "grad_norm": gn, "lr": lr}
        return fields, all_reduce(b["attention_mask"].sum()).item()

    def save(step, **more):
        save_checkpoint(cfg.out_dir, step, {"rm": rm}, {"rm": opt}, {"rm": sched}, {"history": history, **more}, tok)

    step, finished = run_steps(cfg, "rm", "reward model", step, dev, history, train_step, save)
    if not finished:
        return rm, tok, history, float("nan")
    acc = rm_accuracy(rm, tok, eval_rows, dev, max_len=cfg.max_len) if eval_rows else float("nan")
    save(step, eval_acc=acc)
    save_model(rm, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return rm, tok, history, acc
