"""Rollout helpers by hand: the minibatches of an update partition each epoch's rows, and the gold evaluation's
mean reward, EOS rate and response length over several generation batches (test_stages.py checks the sampled
sequences' masks)."""
import statistics

import pytest
import torch


def test_minibatches_partition_every_epoch_and_keep_rows_together():
    from rlhf_kernels.trainer.rollout import minibatches
    B = 12
    exp = {"input_ids": torch.arange(B)[:, None].repeat(1, 5), "adv": torch.arange(B, dtype=torch.float)[:, None] * 10}
    torch.manual_seed(0)
    parts = list(minibatches(exp, 3, 2))
    assert len(parts) == 6
    for epoch in (parts[:3], parts[3:]):
        rows = [int(r) for p in epoch for r in p["input_ids"][:, 0]]
        assert sorted(rows) == list(range(B))   # disjoint, and together every row once
        for p in epoch:
            assert p["input_ids"].shape == (4, 5)
            torch.testing.assert_close(p["adv"][:, 0], p["input_ids"][:, 0].float() * 10)   # one row, all keys
    assert [p["input_ids"][:, 0].tolist() for p in parts[:3]] != [p["input_ids"][:, 0].tolist() for p in parts[3:]]


def test_evaluate_gold_means_over_every_generation_batch(record_rollouts, sft_run):
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import rollout
    task = get_task("letters-easy")
    rolls = record_rollouts(rollout)
    torch.manual_seed(8)
    got = rollout.evaluate_gold(sft_run["model"].eval(), sft_run["tok"], task, task.prompts(7, 0),
                                rollout.SamplingConfig(max_new_tokens=7), "cpu", batch_size=3, max_len=32)
    assert [len(r["prompts"]) for r in rolls] == [3, 3, 1]
    gold = [task.gold_reward(p, r) for roll in rolls for p, r in zip(roll["prompts"], roll["responses"])]
    eos = [float(e) for roll in rolls for e in roll["has_eos"]]
    lens = [len(r) for roll in rolls for r in roll["responses"]]
    assert 0 < statistics.fmean(eos) < 1 and len(set(gold)) > 1
    want = {"gold": statistics.fmean(gold), "gold_std": statistics.stdev(gold), "eos_rate": statistics.fmean(eos),
            "mean_len": statistics.fmean(lens), "n": 7}
    assert got == pytest.approx(want, rel=1e-6)
