"""What DPO logs, by hand: the implicit rewards β·(π - ref) of chosen and rejected, their margin and the preference
accuracy (a tie counts half), the held-out pass over several batches, and the sampled KL(π ‖ ref) per sequence
(test_dpo.py checks the loss through rk.dpo_loss and the sequence log-probs)."""
import pytest
import torch


def test_dpo_stats_by_hand():
    from rlhf_kernels.trainer.dpo import dpo_stats
    pc, pr = torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.tensor([-2.0, -1.0, -3.0, -6.0])
    rc, rr = torch.tensor([-1.5, -2.0, -2.0, -4.0]), torch.tensor([-1.5, -1.5, -2.0, -5.0])
    beta = 0.5
    chosen = [beta * (a - b) for a, b in zip([-1.0, -2.0, -3.0, -4.0], [-1.5, -2.0, -2.0, -4.0])]   # .25 0 -.5 0
    rejected = [beta * (a - b) for a, b in zip([-2.0, -1.0, -3.0, -6.0], [-1.5, -1.5, -2.0, -5.0])]  # -.25 .25 -.5 -.5
    want = {"reward_chosen": sum(chosen) / 4, "reward_rejected": sum(rejected) / 4,
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / 4,
            "acc": (1 + 0 + 0.5 + 1) / 4}   # the third pair is a tie
    assert dpo_stats(pc, pr, rc, rr, beta) == pytest.approx(want, rel=1e-6)


def test_pair_eval_over_several_batches_is_the_statistics_of_all_pairs(eval_models):
    """Batches of 3 over 7 pairs (the last one short): each batch weighs by its size."""
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer.data import collate_pairs
    from rlhf_kernels.trainer.dpo import DPOConfig, dpo_stats, pair_eval, pair_logps
    (policy, ref, _, _), tok = eval_models
    rows = get_task("letters-easy").preference_data(7, 0)
    cfg = DPOConfig(device="cpu", max_len=32, beta=0.3)
    got = pair_eval(policy, ref, tok, rows, cfg, torch.device("cpu"), batch_size=3)
    b = collate_pairs(rows, tok, 32)
    with torch.no_grad():
        want = dpo_stats(*pair_logps(policy, b), *pair_logps(ref, b), 0.3)
    assert 0 < want["acc"] < 1
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_sampled_kl_is_the_k1_sum_per_sequence_over_every_batch(record_rollouts, oracle_logprobs, eval_models):
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import dpo
    from rlhf_kernels.trainer.rollout import SamplingConfig
    (policy, ref, _, _), tok = eval_models
    rolls = record_rollouts(dpo)
    torch.manual_seed(7)
    prompts = get_task("letters-easy").prompts(7, 0)
    got = dpo.sampled_kl(policy, ref, tok, prompts, SamplingConfig(temperature=1.2, max_new_tokens=6),
                         torch.device("cpu"), 32, batch_size=3)
    assert [len(r["prompts"]) for r in rolls] == [3, 3, 1]
    total = sum(float((oracle_logprobs(policy, roll, 1.2) - oracle_logprobs(ref, roll, 1.2)).sum()) for roll in rolls)
    assert got == pytest.approx(total / 7, rel=1e-4, abs=1e-5)
    assert abs(got) > 1e-3
