"""Stopping on a signal without losing work.

Ctrl-C (SIGINT) or a scheduler's SIGTERM (SLURM's pre-emption, ``torchrun`` shutting its workers down) asks
the running stage to finish the step it is in, write a checkpoint and stop, so that the same command with
``--resume`` continues from that step. A second Ctrl-C interrupts at once (``KeyboardInterrupt``), as usual.

The stages' shared loop (``loop.run_steps``)::

    with StopOnSignal() as stop:
        while step < stop_at and not stop.agreed(device):
            ...one step...
    if step < cfg.steps:
        save(step)
        stop.raise_if_requested("sft", step, cfg.steps, cfg.out_dir)

Under ``torchrun`` the ranks must leave the loop at the same step (the checkpoint is a collective), so
``agreed`` all-reduces the flag each step: any rank's signal stops them all.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch

from .distributed import all_reduce, dist_world


class StoppedBySignal(Exception):
    """A stage stopped early on a signal, after writing its checkpoint (``trainer/cli.py`` exits 130)."""

    def __init__(self, stage: str, step: int, steps: int, out_dir: str, signum: int):
        self.stage, self.step, self.steps, self.out_dir, self.signum = stage, step, steps, out_dir, signum
        super().__init__(f"{stage}: stopped by {signal.Signals(signum).name} after step {step} of {steps}; "
                         f"checkpoint in {out_dir}/ckpt")


class StopOnSignal:
    """Context manager: while inside, SIGINT and SIGTERM set ``requested`` (the signal number) instead of
    ending the process. Handlers are only installed from the main thread (Python's rule); elsewhere the
    manager does nothing and signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        self.requested = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(Ctrl-C again stops at once, without it)", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one scalar all-reduce per step under ``torchrun``)."""
        if dist_world() == 1:
            return bool(self.requested)
        signum = all_reduce(torch.tensor(self.requested, device=device), op="max").item()
        self.requested = self.requested or int(signum)
        return bool(signum)

    def raise_if_requested(self, stage: str, step: int, steps: int, out_dir: str) -> None:
        """After the checkpoint: leave the stage by ``StoppedBySignal`` when a signal stopped it."""
        if self.requested:
            raise StoppedBySignal(stage, step, steps, out_dir, self.requested)
