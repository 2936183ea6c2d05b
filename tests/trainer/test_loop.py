"""The stages' shared step loop (``trainer/loop.run_steps``): records, checkpoints, early stops, and the
queued target checks failing the step they belong to."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import rlhf_kernels as rk
from rlhf_kernels.trainer.loop import run_steps


@dataclasses.dataclass
class _Cfg:
    steps: int = 5
    stop_after: int = 0
    ckpt_every: int = 2
    log_every: int = 0
    progress: bool = False
    out_dir: str = "unused"


def _fake_step(seen):
    def train_step(step):
        seen.append(step)
        return {"loss": float(step)}, 100.0
    return train_step


def test_runs_to_the_end_with_records_and_periodic_checkpoints():
    seen, saved, history = [], [], []
    step, finished = run_steps(_Cfg(), "sft", "sft", 0, torch.device("cpu"), history, _fake_step(seen), saved.append)
    assert (step, finished) == (5, True)
    assert seen == [0, 1, 2, 3, 4]
    assert saved == [2, 4]  # every ckpt_every steps, not the last: the stage writes that one with its evaluation
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert list(history[0]) == ["step", "loss", "step_s", "tokens_per_s", "peak_mem_mb"]
    assert all(r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(100.0 / r["step_s"]) for r in history)


def test_resumes_from_a_step_and_stops_after_stop_after_with_a_checkpoint():
    seen, saved, history = [], [], [{"step": 1}]
    step, finished = run_steps(_Cfg(stop_after=2, ckpt_every=0), "ppo", "ppo", 1, torch.device("cpu"), history,
                               _fake_step(seen), saved.append)
    assert (step, finished) == (3, False)
    assert seen == [1, 2] and saved == [3]
    assert [r["step"] for r in history] == [1, 2, 3]


def test_a_bad_target_queued_by_the_step_fails_that_step(monkeypatch):
    """Under the CLI the checks are queued (``RLHF_KERNELS_VALIDATE=async``): the loop waits for them after each
    step, so a bad target raises there, naming the op, before the step is recorded."""
    from rlhf_kernels.ops import _deferred_checks

    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "async")
    monkeypatch.setattr(_deferred_checks, "ASYNC_DEVICES", ("cuda", "cpu"))  # queue on the CPU too
    history, saved, returned = [], [], []

    def train_step(step):
        if step == 1:
            rk.logprobs(torch.zeros(2, 4), torch.tensor([0, 9]))  # 9 is outside the vocabulary of 4
        returned.append(step)  # the op only queued its check: the step itself finishes
        return {}, 1.0

    with pytest.raises(ValueError, match=r"targets\[1\] = 9 is outside \[0, 4\)"):
        run_steps(_Cfg(), "sft", "sft", 0, torch.device("cpu"), history, train_step, saved.append)
    assert returned == [0, 1]
    assert [r["step"] for r in history] == [1]
