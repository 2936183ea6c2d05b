"""The learning-rate schedule by hand: linear warm-up, then a cosine from 1 down to ``min_ratio`` (config.lr_lambda),
and the rate each SFT / reward-model / DPO step logs is the one it used."""
import math

import pytest


def _by_hand(step, warmup, total, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("step, want", [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0), (9, 0.55), (14, 0.1), (30, 0.1)])
def test_warmup_then_cosine_to_the_floor(step, want):
    from rlhf_kernels.trainer.config import lr_lambda
    assert lr_lambda(4, 14, 0.1)(step) == pytest.approx(want, abs=1e-12)   # 9: halfway down the cosine


@pytest.mark.parametrize("warmup, total, min_ratio", [(0, 10, 0.1), (1, 1, 0.5), (3, 3, 0.2), (2, 7, 1.0)])
def test_schedules_without_warmup_or_decay(warmup, total, min_ratio):
    from rlhf_kernels.trainer.config import lr_lambda
    f = lr_lambda(warmup, total, min_ratio)
    for step in range(total + 3):
        assert f(step) == pytest.approx(_by_hand(step, warmup, total, min_ratio), abs=1e-12), step
    assert f(warmup) == 1.0 and f(total + 2) == pytest.approx(min_ratio)


def test_each_logged_rate_is_the_one_its_step_used(tmp_path, tiny, sft_run):
    from rlhf_kernels.trainer.dpo import DPOConfig, train_dpo
    from rlhf_kernels.trainer.reward import RMConfig, train_rm
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    kw = dict(tiny, task="letters-easy", steps=6, warmup_steps=3, lr=1e-2, batch_size=4)
    _, _, sft = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "sft"), n_train=64))
    assert [r["lr"] for r in sft] == pytest.approx([1e-2 * _by_hand(s, 3, 6, 0.1) for s in range(6)], rel=1e-9)
    _, _, rm, _ = train_rm(RMConfig(**kw, out_dir=str(tmp_path / "rm"), init=sft_run["dir"], n_train=64))
    assert [r["lr"] for r in rm] == pytest.approx([1e-2 * _by_hand(s, 3, 6, 0.1) for s in range(6)], rel=1e-9)
    _, _, dpo, _ = train_dpo(DPOConfig(**kw, out_dir=str(tmp_path / "dpo"), sft=sft_run["dir"], n_train=64,
                                       eval_prompts=0))
    assert [r["lr"] for r in dpo] == pytest.approx([1e-2 * _by_hand(s, 3, 6, 1.0) for s in range(6)], rel=1e-9)
