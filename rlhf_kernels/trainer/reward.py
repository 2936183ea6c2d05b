"""Reward model: Bradley-Terry  -log σ(r(x, y_c) - r(x, y_r) - margin)  (+ optional centering),
through ``rk.reward_model_loss``; held-out pairwise accuracy reported.

The reward model is the LM body (initialised from the SFT policy) plus a scalar head read at
the last non-pad token.

    python -m rlhf_kernels.trainer.cli rm --data pairs.jsonl --init runs/sft/final --out_dir runs/rm
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, collate_pairs, load_jsonl, validate_rows
from .models import ScalarHeadModel, build_policy, device_of, load_policy, peak_memory_mb
from .sft import _log, _pbar


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
    """Rewards of the chosen [B] and rejected [B] halves of a pair batch."""
    r = rm.score(batch["input_ids"], batch["attention_mask"])
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
    dev = device_of(cfg.device)
    if rm is None:
        if cfg.init:
            lm, tok = load_policy(cfg.init)
        else:
            lm, tok = build_policy(cfg.model_config())
        rm = ScalarHeadModel.from_causal_lm(lm)
        del lm
    rm.to(dev).train()
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
    pbar = _pbar(cfg, "reward model", initial=step)
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    while step < stop_at:
        t0 = time.perf_counter()
        b = collate_pairs([rows[i] for i in batches(len(rows), cfg.batch_size, cfg.seed, step)], tok, cfg.max_len)
        b = {k: v.to(dev) for k, v in b.items()}
        rc, rr = rm_forward(rm, b)
        loss = rk.reward_model_loss(rc, rr, margin=cfg.margin, center_coef=cfg.center_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss.item(), "acc": (rc > rr).float().mean().item(),
               "margin": (rc - rr).mean().item(), "grad_norm": gn.item(), "lr": sched.get_last_lr()[0],
               "tokens_per_s": b["attention_mask"].sum().item() / dt, "peak_mem_mb": peak_memory_mb(dev)}
        history.append(rec)
        _log(pbar, cfg, rec)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            save_checkpoint(cfg.out_dir, step, {"rm": rm}, {"rm": opt}, {"rm": sched}, {"history": history}, tok)
    pbar.close()
    if step < cfg.steps:  # stopped early (stop_after): checkpoint and leave the rest to --resume
        save_checkpoint(cfg.out_dir, step, {"rm": rm}, {"rm": opt}, {"rm": sched}, {"history": history}, tok)
        return (rm, tok, history, float("nan"))
    acc = rm_accuracy(rm, tok, eval_rows, dev, max_len=cfg.max_len) if eval_rows else float("nan")
    save_checkpoint(cfg.out_dir, step, {"rm": rm}, {"rm": opt}, {"rm": sched},
                    {"history": history, "eval_acc": acc}, tok)
    final = os.path.join(cfg.out_dir, "final")
    rm.save_pretrained(final)
    tok.save_pretrained(final)
    return rm, tok, history, acc
