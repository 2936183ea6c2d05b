"""The trainer's losses on a fixed batch are the same with the default (fused) backend and
the plain-PyTorch reference backend (what RLHF_KERNELS_BACKEND=torch selects)."""
import copy

import pytest
import torch

from rlhf_kernels.tasks import get_task


def _stage_losses(backend, sft_model, tok, rm_dir, tiny):
    from rlhf_kernels.trainer.data import collate_pairs, collate_sft
    from rlhf_kernels.trainer.models import ScalarHeadModel
    from rlhf_kernels.trainer.ppo import PPOConfig, make_experience, ppo_update
    from rlhf_kernels.trainer.reward import rm_forward
    from rlhf_kernels.trainer.sft import sft_loss
    import rlhf_kernels as rk

    task = get_task()
    out = {}
    model = copy.deepcopy(sft_model)
    b = collate_sft(task.sft_data(16, 7), tok)
    loss, _ = sft_loss(model, b, backend)
    loss.backward()
    out["sft_loss"] = loss.detach()
    out["sft_grad"] = model.transformer.wte.weight.grad.clone()

    rm = ScalarHeadModel.from_pretrained(rm_dir)
    rc, rr = rm_forward(rm, collate_pairs(task.preference_data(16, 7), tok))
    out["rm_loss"] = rk.reward_model_loss(rc, rr).detach()

    cfg = PPOConfig(**tiny, backend=backend, rollout_batch=16, ppo_epochs=1, minibatches=2, kl_estimator="k3")
    policy, ref, critic = copy.deepcopy(sft_model), copy.deepcopy(sft_model), copy.deepcopy(rm)
    torch.manual_seed(0)
    exp, stats = make_experience(cfg, policy, ref, critic, rm, tok, task.prompts(16, 7), 0.05, torch.device("cpu"), task)
    for k in ("old_logp", "adv", "returns"):
        out["exp_" + k] = exp[k]
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    copt = torch.optim.SGD(critic.parameters(), lr=0.1)
    upd = ppo_update(cfg, policy, critic, opt, copt, exp, 0.05)
    out.update({"ppo_" + k: torch.tensor(v) for k, v in upd.items()})
    return out


@pytest.mark.parametrize("via_env", [False, True])
def test_fused_and_eager_give_the_same_losses(via_env, monkeypatch, tiny, sft_run, rm_run):
    torch.manual_seed(0)
    fused = _stage_losses(None, sft_run["model"], sft_run["tok"], rm_run["dir"], tiny)
    if via_env:
        monkeypatch.setenv("RLHF_KERNELS_BACKEND", "torch")
        eager = _stage_losses(None, sft_run["model"], sft_run["tok"], rm_run["dir"], tiny)
    else:
        eager = _stage_losses("torch", sft_run["model"], sft_run["tok"], rm_run["dir"], tiny)
    assert fused.keys() == eager.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], eager[k], rtol=1e-4, atol=1e-5, msg=k)
