"""Supervised fine-tuning: -Σ_{t∈response} log P(x_t | x_<t), through the fused log-prob op.

    python -m rlhf_kernels.trainer.cli sft --data sft.jsonl --out_dir runs/sft --steps 200
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli sft ... [--parallel fsdp]

Under ``torchrun`` each rank takes ``batch_size / K`` rows of every step and the loss is normalised
by the all-reduced token count, so K ranks take the single-process update (distributed.py).
``--fused-head``: the same loss by ``rk.linear_cross_entropy`` from the final hidden states and the LM
head, its gradient computed in the forward pass; the ``[B, T, V]`` logits never exist (fused_head.py).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, collate_sft, load_jsonl, shifted_targets, validate_rows
from .distributed import all_reduce, barrier, clip_grad_norm, dist_setup, global_loss_scale, wrap_model
from .fused_head import FusedHeadLM, is_fused_head
from .loop import run_steps
from .models import build_policy, fit_max_len, logits_are_free_after_the_loss


@dataclass
class SFTConfig(BaseConfig):
    out_dir: str = "runs/sft"
    data: str | None = None     # JSONL with prompt/response; None = the embedded task
    task: str = "letters"
    n_train: int = 4000         # embedded-task examples
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3

    def validate(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def sft_loss(model, batch, backend=None):
    """Token-mean NLL over response tokens. Returns (loss, n_tokens).

    An HF causal LM: ``rk.logprobs`` on ``logits[:, :-1]``. A ``FusedHeadLM`` (``--fused-head``; DDP-wrapped
    or not): ``rk.linear_cross_entropy`` inside its forward, gradient computed in the forward pass."""
    targets = shifted_targets(batch["input_ids"], batch["loss_mask"])
    n = (targets != -100).sum()
    if is_fused_head(model):
        return model(batch["input_ids"], batch["attention_mask"], targets, op="cross_entropy", backend=backend), n
    # HF's default positions (arange): SFT batches are right-padded, so they equal the mask's on every real token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    # a strided view, no copy; the logits serve nothing else, so the backward writes their gradient over them
    logp = rk.logprobs(logits[:, :-1], targets, backend=backend,
                       overwrite_logits=logits_are_free_after_the_loss(model))
    return -logp.sum() / n.clamp(min=1), n


def train_sft(cfg: SFTConfig, model=None, tok=None, rows=None):
    """Returns (model, tokenizer, history). ``rows`` overrides cfg.data / the task."""
    seed_all(cfg.seed, cfg.threads)
    rank, world, dev = dist_setup(cfg.device)
    if rank > 0:  # rank 0 logs
        cfg = dataclasses.replace(cfg, progress=False, log_every=0)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by the number of ranks ({world})")
    if model is None:
        model, tok = build_policy(cfg.model_config())
    cfg = fit_max_len(cfg, model)
    model.to(dev).train()
    actor = FusedHeadLM(model) if cfg.fused_head else model   # --fused-head: the loss without logits
    wrapped = wrap_model(actor, cfg.parallel, dev)   # DDP wrapper, or `actor` itself sharded by FSDP2
    if rows is None:
        if cfg.data:
            rows = load_jsonl(cfg.data, "sft")
        else:
            from ..tasks import get_task
            rows = get_task(cfg.task).sft_data(cfg.n_train, cfg.seed)
    rows = validate_rows(rows, "sft")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    step, history = 0, []
    if cfg.resume and (ck := latest_checkpoint(cfg.out_dir)):
        step, extra = load_checkpoint(ck, {"policy": actor}, {"policy": opt}, {"policy": sched})
        history = extra.get("history", [])

    def train_step(step):
        idx = batches(len(rows), cfg.batch_size, cfg.seed, step)[rank::world]   # this rank's share
        batch = {k: v.to(dev) for k, v in collate_sft([rows[i] for i in idx], tok, cfg.max_len).items()}
        loss, _ = sft_loss(wrapped, batch, cfg.backend)
        loss = loss * global_loss_scale("token-mean", batch["loss_mask"][:, 1:])  # 1 in one process
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = clip_grad_norm(model.parameters(), cfg.grad_clip)
        opt.step()
        lr = sched.get_last_lr()[0]   # the rate this step used (after sched.step(), the next step's)
        sched.step()
        loss_v = all_reduce(loss.detach()).item() / world   # the rank shares average to the global loss
        fields = {"loss": loss_v, "grad_norm": gn, "lr": lr}
        return fields, all_reduce(batch["attention_mask"].sum()).item()

    def save(step):
        save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched},
                        {"history": history}, tok)

    step, finished = run_steps(cfg, "sft", "sft", step, dev, history, train_step, save)
    if not finished:
        return model, tok, history
    save(step)
    save_model(actor, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return model, tok, history
