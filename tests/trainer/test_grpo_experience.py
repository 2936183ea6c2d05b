"""GRPO's experience and update by hand: the reward (gold or reward model, minus the missing-EOS penalty), the
group advantages broadcast over each response's tokens, and the statistics an update reports, recomputed here in
float64 from what the trainer sampled (test_grpo.py checks ``group_advantages`` on its own)."""
import statistics

import pytest
import torch

from rlhf_kernels import reference


def _group_advantages_by_hand(rewards, G, scale):
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g:g + G]
        mean = statistics.fmean(group)
        std = {"group": statistics.stdev(group), "batch": statistics.stdev(rewards), "none": 0.0}[scale]
        out += [(r - mean) / (std + 1e-4) if scale != "none" else r - mean for r in group]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("reward, scale", [("gold", "group"), ("rm", "batch"), ("rm", "none")])
def test_make_group_experience_by_hand(record_rollouts, tiny, eval_models, reward, scale):
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import grpo
    from rlhf_kernels.trainer.rollout import gold_rewards
    (policy, ref, _, rm), tok = eval_models
    task = get_task("letters-easy")
    cfg = grpo.GRPOConfig(**tiny, reward=reward, scale_rewards=scale, num_generations=3, max_new_tokens=7,
                          missing_eos_penalty=1.5)
    rolls = record_rollouts(grpo)
    torch.manual_seed(5)
    prompts = task.prompts(4, 0)
    exp, stats = grpo.make_group_experience(cfg, policy, ref, rm, tok, prompts, torch.device("cpu"), task)
    roll = rolls[0]
    assert roll["prompts"] == [p["prompt"] for p in prompts for _ in range(3)]   # each prompt's group is consecutive
    has_eos, mask = roll["has_eos"], roll["loss_mask"][:, 1:].double()
    assert has_eos.any() and not has_eos.all(), "the sample must hold responses with and without EOS"
    gold = gold_rewards(task, roll).double()
    with torch.no_grad():
        score = gold if reward == "gold" else rm.score(roll["input_ids"], roll["attention_mask"]).double()
    r = score - 1.5 * (~has_eos).double()
    adv = _group_advantages_by_hand(r.tolist(), 3, scale)
    torch.testing.assert_close(exp["adv"].double(), adv[:, None] * mask, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exp["mask"].double(), mask)

    old, ref_lp = exp["old_logp"].double(), exp["ref_logp"].double()
    groups = r.view(-1, 3)
    want = {"reward": r.mean().item(), "reward_std": r.std().item(),
            "frac_zero_std": (groups.std(1) < 1e-6).double().mean().item(),
            "kl": ((old - ref_lp) * mask).sum(1).mean().item(), "resp_len": mask.sum(1).mean().item(),
            "eos_rate": has_eos.double().mean().item(), "gold": gold.mean().item()}
    assert stats == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_group_of_equal_rewards_counts_as_giving_no_signal(monkeypatch, tiny, eval_models):
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import grpo
    (policy, ref, _, rm), tok = eval_models
    cfg = grpo.GRPOConfig(**tiny, reward="gold", num_generations=2, max_new_tokens=7)
    monkeypatch.setattr(grpo, "gold_rewards", lambda task, roll: torch.tensor([0.5, 0.5, 1.0, 0.0, 0.2, 0.2]))
    torch.manual_seed(5)
    exp, stats = grpo.make_group_experience(cfg, policy, ref, rm, tok, get_task("letters-easy").prompts(3, 0),
                                            torch.device("cpu"), get_task("letters-easy"))
    assert stats["frac_zero_std"] == pytest.approx(2 / 3)
    assert exp["adv"][[0, 1, 4, 5]].abs().max() == 0


@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.0), ("dr_grpo", 0.2), ("dapo", 0.05)])
def test_grpo_update_reports_the_losses_and_statistics_of_its_minibatches(tiny, eval_models, loss_type, beta):
    """Learning rate 0: every epoch sees the same policy, so each statistic (a mean over minibatches) is the
    oracle's on the whole rollout, and the gradient norm is that of the oracle's loss."""
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import grpo
    from rlhf_kernels.trainer.models import lm_logits
    (policy, ref, _, rm), tok = eval_models
    cfg = grpo.GRPOConfig(**tiny, loss_type=loss_type, beta=beta, num_generations=2, ppo_epochs=3, minibatches=1,
                          max_new_tokens=7, entropy_coef=0.02, grad_clip=1e-3)
    task = get_task("letters-easy")
    torch.manual_seed(6)
    exp, _ = grpo.make_group_experience(cfg, policy, ref, rm, tok, task.prompts(4, 0), torch.device("cpu"), task)
    g = torch.Generator().manual_seed(2)
    mask = exp["mask"]
    exp["old_logp"] = exp["old_logp"] + 0.3 * torch.randn(mask.shape, generator=g) * mask   # ratios away from 1
    got = grpo.grpo_update(cfg, policy, torch.optim.SGD(policy.parameters(), lr=0.0), exp)

    policy.zero_grad(set_to_none=True)
    want = reference.ppo_loss(lm_logits(policy, exp["input_ids"], exp["attention_mask"])[:, :-1].double(),
                              exp["targets"], exp["old_logp"], exp["adv"], mask,
                              ref_logp=exp["ref_logp"] if beta > 0 else None, kl_coef=beta, kl_estimator="k3",
                              entropy_coef=0.02, clip_low=0.2, clip_high=cfg.clip_hi, loss_agg=cfg.loss_agg)
    want.loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in policy.parameters()]))
    policy.zero_grad(set_to_none=True)
    assert 0 < float(want.clip_frac) < 1
    m = mask.double()
    expected = {"pg_loss": float(want.loss.detach()), "clip_frac": float(want.clip_frac),
                "approx_kl": float(want.approx_kl), "entropy": float((want.entropy * m).sum() / m.sum()),
                "grad_norm": float(grad_norm)}
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
