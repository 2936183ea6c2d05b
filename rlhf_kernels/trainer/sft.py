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
import time
from dataclasses import dataclass

import torch

import rlhf_kernels as rk

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_model
from .config import BaseConfig, lr_lambda, seed_all
from .data import batches, collate_sft, load_jsonl, shifted_targets, validate_rows
from .distributed import all_reduce, barrier, clip_grad_norm, dist_setup, global_loss_scale, wrap_model
from .fused_head import FusedHeadLM, is_fused_head
from .interrupt import StopOnSignal
from .models import build_policy, fit_max_len, peak_memory_mb


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
    logp = rk.logprobs(logits[:, :-1], targets, backend=backend)  # strided view, no copy
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
    pbar = _pbar(cfg, "sft", initial=step)
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop (interrupt.py)
        while step < stop_at and not stop.agreed(dev):
            t0 = time.perf_counter()
            idx = batches(len(rows), cfg.batch_size, cfg.seed, step)[rank::world]   # this rank's share
            batch = {k: v.to(dev) for k, v in collate_sft([rows[i] for i in idx], tok, cfg.max_len).items()}
            loss, _ = sft_loss(wrapped, batch, cfg.backend)
            loss = loss * global_loss_scale("token-mean", batch["loss_mask"][:, 1:])  # 1 in one process
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = clip_grad_norm(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            rk.check_pending_targets()  # queued checks under the CLI (trainer/cli.py): a bad target fails this step
            dt = time.perf_counter() - t0
            loss_v = all_reduce(loss.detach()).item() / world   # the rank shares average to the global loss
            rec = {"step": step, "loss": loss_v, "grad_norm": gn, "lr": sched.get_last_lr()[0],
                   "tokens_per_s": all_reduce(batch["attention_mask"].sum()).item() / dt,
                   "peak_mem_mb": peak_memory_mb(dev)}
            history.append(rec)
            _log(pbar, cfg, rec)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched},
                                {"history": history}, tok)
    pbar.close()
    if step < cfg.steps:  # stopped early (stop_after, a signal): checkpoint and leave the rest to --resume
        save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched}, {"history": history}, tok)
        stop.raise_if_requested("sft", step, cfg.steps, cfg.out_dir)
        return (model, tok, history)
    save_checkpoint(cfg.out_dir, step, {"policy": actor}, {"policy": opt}, {"policy": sched}, {"history": history}, tok)
    save_model(actor, os.path.join(cfg.out_dir, "final"), tok)
    barrier()
    return model, tok, history


def _pbar(cfg, desc, initial=0):
    from tqdm.auto import tqdm
    return tqdm(total=cfg.steps, initial=initial, desc=desc, disable=not cfg.progress, dynamic_ncols=True)


def _log(pbar, cfg, rec):
    pbar.update(1)
    pbar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k in ("loss", "acc", "gold", "proxy", "kl")},
                     refresh=False)
    if cfg.log_every and rec["step"] % cfg.log_every == 0:
        line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        (pbar.write if cfg.progress else print)(line)
