"""The step loop the training stages share (SFT, reward model, PPO, GRPO, DPO).

Each stage supplies one optimiser step; this module runs it until the stage is done, stopped early by
``stop_after`` or stopped by a signal (``interrupt.py``), and does what every step needs around it:

- the record ``{"step", **the step's fields, "step_s", "tokens_per_s", "peak_mem_mb"}``, appended to the
  history, shown on the progress bar and printed every ``log_every`` steps;
- the target checks the CLI queues (``RLHF_KERNELS_VALIDATE=async``): a bad target fails the step it was in;
- a checkpoint every ``ckpt_every`` steps, and one when the loop stops before the last step.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

import rlhf_kernels as rk

from .interrupt import StopOnSignal
from .models import peak_memory_mb

# train_step(step) -> (fields, tokens): the optimiser step numbered `step` (0-based), its record's own
# entries, and the tokens it processed on all ranks (for tokens/s)
TrainStep = Callable[[int], "tuple[dict, float]"]


def run_steps(cfg, stage: str, desc: str, step: int, device: torch.device, history: list,
              train_step: TrainStep, save: Callable[[int], None]) -> tuple[int, bool]:
    """Runs ``train_step`` from ``step`` to ``cfg.steps`` and returns ``(step reached, finished)``.

    Stops after ``cfg.stop_after`` steps (when set) or at a signal: then it saves a checkpoint at the step
    reached and returns ``finished=False``, or raises ``StoppedBySignal`` if a signal stopped it (the CLI
    prints the ``--resume`` command). A finished stage is not saved here: each stage writes its final
    checkpoint with what its evaluation adds. ``save(step)`` runs on every rank (FSDP2 gathers the shards).
    """
    pbar = progress_bar(cfg, desc, initial=step)
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps
    with StopOnSignal() as stop:  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop (interrupt.py)
        while step < stop_at and not stop.agreed(device):
            t0 = time.perf_counter()
            fields, tokens = train_step(step)
            step += 1
            rk.check_pending_targets()  # queued checks under the CLI (trainer/cli.py): a bad target fails this step
            dt = time.perf_counter() - t0
            rec = {"step": step, **fields, "step_s": dt, "tokens_per_s": tokens / dt,
                   "peak_mem_mb": peak_memory_mb(device)}
            history.append(rec)
            log_record(pbar, cfg, rec)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step)
    pbar.close()
    if step < cfg.steps:  # stopped early (stop_after, a signal): checkpoint and leave the rest to --resume
        save(step)
        stop.raise_if_requested(stage, step, cfg.steps, cfg.out_dir)
        return step, False
    return step, True


def progress_bar(cfg, desc: str, initial: int = 0):
    """A tqdm bar over ``cfg.steps`` (disabled by ``--progress false`` and on ranks > 0)."""
    from tqdm.auto import tqdm
    return tqdm(total=cfg.steps, initial=initial, desc=desc, disable=not cfg.progress, dynamic_ncols=True)


def log_record(pbar, cfg, rec: dict) -> None:
    """Advances the bar, shows the headline numbers on it, and prints the whole record every ``log_every`` steps."""
    pbar.update(1)
    pbar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k in ("loss", "acc", "gold", "proxy", "kl")},
                     refresh=False)
    if cfg.log_every and rec["step"] % cfg.log_every == 0:
        line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        (pbar.write if cfg.progress else print)(line)
