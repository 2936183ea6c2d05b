"""PPO's experience by hand: advantage whitening, the per-token KL penalty in the reward, the score on the last
response token, the missing-EOS penalty, GAE and the adaptive KL controller, each recomputed here in float64 from
what the trainer sampled. The trainer's other tests compare runs with runs (resume, ranks, fused head), which an
error shared by both sides would pass."""
import math

import pytest
import torch

from rlhf_kernels import reference


def _whiten_by_hand(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the entries where mask is 1 (population variance), 0 elsewhere."""
    vals = [float(v) for v, m in zip(x.flatten(), mask.flatten()) if m]
    n = max(len(vals), 1)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / n
    out = [(float(v) - mean) / math.sqrt(var + eps) if m else 0.0 for v, m in zip(x.flatten(), mask.flatten())]
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def _gae_by_hand(rewards, values, mask, gamma, lam):
    """One sequence at a time, over its masked tokens only (the response is contiguous)."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_value = next_adv = 0.0
        for t in reversed(steps):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, t])
            adv[b, t] = next_adv
    return adv, (adv + values.double()) * mask.double()


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 4)])
def test_masked_whiten_is_the_masked_mean_and_population_std(shape):
    from rlhf_kernels.trainer.ppo import masked_whiten
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5   # an offset and scale whitening must remove
    mask = (torch.rand(shape, generator=g) < 0.7).double()
    mask.view(-1)[0] = 1
    x[mask == 0] = 1e6   # values under the mask must not count
    torch.testing.assert_close(masked_whiten(x, mask), _whiten_by_hand(x, mask), rtol=1e-7, atol=1e-7)
    assert masked_whiten(x, torch.zeros_like(mask)).abs().max() == 0   # nothing to whiten: zeros, not NaN


def test_masked_whiten_of_a_constant_is_zero_and_its_eps_is_inside_the_root():
    from rlhf_kernels.trainer.ppo import masked_whiten
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_whiten(torch.tensor([[2.0, 2.0, 9.0]]), mask), torch.zeros(1, 3))
    # var = 1e-8 = eps: (x - mean) / sqrt(2e-8)
    x = torch.tensor([[1e-4, -1e-4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(masked_whiten(x, mask.double()), _whiten_by_hand(x, mask), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kl_in_reward, estimator, whiten", [(True, "k1", True), (True, "k3", False),
                                                              (False, "k2", True)])
def test_make_experience_by_hand(record_rollouts, oracle_logprobs, tiny, eval_models, kl_in_reward, estimator, whiten):
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import ppo
    (policy, ref, critic, rm), tok = eval_models
    task = get_task("letters-easy")
    cfg = ppo.PPOConfig(**tiny, kl_in_reward=kl_in_reward, kl_estimator=estimator, whiten_advantages=whiten,
                        kl_coef=0.3, gamma=0.9, lam=0.8, max_new_tokens=7, missing_eos_penalty=2.5, temperature=1.3)
    rolls = record_rollouts(ppo)
    torch.manual_seed(3)
    exp, stats = ppo.make_experience(cfg, policy, ref, critic, rm, tok, task.prompts(12, 0), cfg.kl_coef,
                                     torch.device("cpu"), task)
    roll = rolls[0]
    ids, attn, has_eos = roll["input_ids"], roll["attention_mask"], roll["has_eos"]
    assert has_eos.any() and not has_eos.all(), "the sample must hold responses with and without EOS"
    mask = roll["loss_mask"][:, 1:].double()
    torch.testing.assert_close(exp["mask"].double(), mask)
    old, ref_lp = oracle_logprobs(policy, roll, 1.3), oracle_logprobs(ref, roll, 1.3)
    with torch.no_grad():
        values = critic(ids, attn)[:, :-1].double() * mask
        score = rm.score(ids, attn).double() - 2.5 * (~has_eos).double()
    torch.testing.assert_close(exp["old_logp"].double(), old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp["ref_logp"].double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp["values"].double(), values, rtol=1e-5, atol=1e-5)

    d = ref_lp - old   # the estimators of reference.kl_estimate, spelled out
    kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[estimator]
    rewards = -0.3 * kl * mask if kl_in_reward else torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        last = max(t for t in range(mask.shape[1]) if mask[b, t])
        rewards[b, last] += score[b]
    adv, ret = _gae_by_hand(rewards, values, mask, 0.9, 0.8)
    if whiten:
        adv = _whiten_by_hand(adv, mask)
    torch.testing.assert_close(exp["adv"].double(), adv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exp["returns"].double(), ret, rtol=1e-4, atol=1e-4)

    assert stats["proxy"] == pytest.approx(score.mean().item(), rel=1e-5, abs=1e-6)   # after the EOS penalty
    assert stats["kl"] == pytest.approx(((old - ref_lp) * mask).sum(1).mean().item(), rel=1e-4, abs=1e-5)
    assert stats["resp_len"] == pytest.approx(mask.sum(1).mean().item())
    assert stats["eos_rate"] == pytest.approx(has_eos.double().mean().item())


@pytest.mark.parametrize("kl, error", [(0.0, -0.2), (1.5, -0.2), (1.7, -0.15), (2.0, 0.0), (2.3, 0.15),
                                       (2.5, 0.2), (40.0, 0.2), (-3.0, -0.2)])
def test_adapted_kl_coef_by_hand(kl, error):
    """β·(1 + clip(KL / target - 1, ±0.2)·rollout_batch / horizon) with target 2, batch 64, horizon 1000."""
    from rlhf_kernels.trainer.ppo import PPOConfig, adapted_kl_coef
    cfg = PPOConfig(kl_target=2.0, rollout_batch=64, kl_horizon=1000)
    assert adapted_kl_coef(0.05, kl, cfg) == pytest.approx(0.05 * (1 + error * 64 / 1000), rel=1e-12)


def test_adaptive_kl_follows_the_proportional_controller(tmp_path, tiny, sft_run, rm_run):
    """β ← β·(1 + clip(KL / target - 1, ±0.2)·rollout_batch / horizon), from each step's own KL (Ziegler et al.)."""
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    beta, errors = 0.05, set()
    for target in (1e-6, 1e6):   # the KL far above, then far below its target: both ends of the clip
        cfg = PPOConfig(**tiny, out_dir=str(tmp_path / str(target)), sft=sft_run["dir"], rm=rm_run["dir"], steps=3,
                        rollout_batch=8, ppo_epochs=1, minibatches=1, lr=1e-2, kl_coef=beta, adaptive_kl=True,
                        kl_target=target, kl_horizon=40, eval_prompts=0)
        _, _, hist, _ = train_ppo(cfg)
        coef = beta
        for rec in hist:
            err = max(-0.2, min(0.2, rec["kl"] / target - 1.0))
            coef *= 1.0 + err * 8 / 40
            errors.add(err)
            assert rec["kl_coef"] == pytest.approx(coef, rel=1e-12), (target, hist)
        assert hist[-1]["kl_coef"] != beta
    assert {-0.2, 0.2} <= errors, errors


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_ppo_update_reports_the_losses_and_statistics_of_its_minibatches(tiny, eval_models, kl_in_reward):
    """With the learning rates at 0 every epoch sees the same models, so each statistic the update reports (a mean
    over its minibatches) is the oracle's value on the whole rollout: the policy loss with its clip fraction,
    approximate KL and entropy, and the critic's clipped value loss."""
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer import ppo
    from rlhf_kernels.trainer.models import lm_logits
    (policy, ref, critic, rm), tok = eval_models
    cfg = ppo.PPOConfig(**tiny, kl_in_reward=kl_in_reward, kl_estimator="k3", kl_coef=0.3, ppo_epochs=3,
                        minibatches=1, clip=0.1, value_clip=0.05, entropy_coef=0.01, max_new_tokens=7,
                        loss_agg="seq-mean-token-mean")
    torch.manual_seed(4)
    exp, _ = ppo.make_experience(cfg, policy, ref, critic, rm, tok, get_task("letters-easy").prompts(8, 0),
                                 cfg.kl_coef, torch.device("cpu"), None)
    g = torch.Generator().manual_seed(1)
    mask = exp["mask"]
    exp["old_logp"] = exp["old_logp"] + 0.3 * torch.randn(mask.shape, generator=g) * mask   # ratios away from 1
    exp["values"] = exp["values"] + 0.1 * torch.randn(mask.shape, generator=g) * mask       # some values clipped
    opt = torch.optim.AdamW(policy.parameters(), lr=0.0)
    copt = torch.optim.AdamW(critic.parameters(), lr=0.0)
    got = ppo.ppo_update(cfg, policy, critic, opt, copt, exp, cfg.kl_coef)

    ids, attn, m = exp["input_ids"], exp["attention_mask"], mask.double()
    with torch.no_grad():
        want = reference.ppo_loss(lm_logits(policy, ids, attn)[:, :-1].double(), exp["targets"], exp["old_logp"],
                                  exp["adv"], mask, ref_logp=None if kl_in_reward else exp["ref_logp"],
                                  kl_coef=0.0 if kl_in_reward else 0.3, kl_estimator="k3", entropy_coef=0.01,
                                  clip_low=0.1, clip_high=0.1, loss_agg="seq-mean-token-mean")
        vl = reference.value_loss(critic(ids, attn)[:, :-1].double(), exp["values"], exp["returns"], mask,
                                  clip=0.05, loss_agg="seq-mean-token-mean")
    assert 0 < float(want.clip_frac) < 1 and float(want.approx_kl) > 0
    expected = {"pg_loss": float(want.loss), "value_loss": float(vl), "clip_frac": float(want.clip_frac),
                "approx_kl": float(want.approx_kl), "entropy": float((want.entropy * m).sum() / m.sum())}
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
