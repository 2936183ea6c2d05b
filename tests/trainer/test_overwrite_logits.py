"""The trainer's losses write the gradient over the model's logits unless its head keeps them (overwrite_logits):
the PPO / GRPO policy loss, the SFT loss and DPO's sequence log-probs."""

import copy

import torch

from rlhf_kernels.trainer import rollout


def _tiny_lm(**extra):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    conf = GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, **extra)  # no dropout: two runs must see the same graph
    return GPT2LMHeadModel(conf)


def _minibatch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (3, 9), generator=g)
    mask = torch.ones(3, 8)
    mask[0, :3] = 0  # a prompt
    targets = torch.where(mask.bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    return {"input_ids": ids, "attention_mask": torch.ones(3, 9, dtype=torch.long), "targets": targets,
            "old_logp": torch.randn(3, 8, generator=g) - 3, "adv": torch.randn(3, 8, generator=g), "mask": mask}


def _assert_same_gradients_either_way(monkeypatch, module, op_name, loss_of):
    """Run ``loss_of(model)`` backward with ``module``'s ``logits_are_free_after_the_loss`` forced False then True:
    the flag reaches ``rk.<op_name>`` as ``overwrite_logits``, and every parameter gradient is the same bits."""
    grads, flags = [], []
    real = getattr(module.rk, op_name)
    for free in (False, True):
        monkeypatch.setattr(module, "logits_are_free_after_the_loss", lambda m, free=free: free)
        monkeypatch.setattr(module.rk, op_name, lambda *a, **k: (flags.append(k["overwrite_logits"]), real(*a, **k))[1])
        m = copy.deepcopy(_tiny_lm())
        loss_of(m).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    monkeypatch.setattr(module.rk, op_name, real)
    assert flags == [False, True], module.__name__
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_policy_loss_overwrites_a_plain_heads_logits_with_the_same_gradients(monkeypatch):
    assert rollout.logits_are_free_after_the_loss(_tiny_lm())
    assert rollout.logits_are_free_after_the_loss(torch.nn.Linear(2, 3))  # no config at all
    e = _minibatch()
    _assert_same_gradients_either_way(monkeypatch, rollout, "ppo_loss",
                                      lambda m: rollout.policy_loss(m, e, entropy_coef=0.01).loss)


def test_a_soft_capped_head_keeps_its_logits():
    class Capped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"final_logit_softcapping": 30.0})()

    assert not rollout.logits_are_free_after_the_loss(Capped())
    wrapped = torch.nn.Module()
    wrapped.module = Capped()  # as DDP holds it
    assert not rollout.logits_are_free_after_the_loss(wrapped)
    assert rollout.logits_are_free_after_the_loss(_tiny_lm())


def test_the_sft_and_dpo_losses_overwrite_with_the_same_gradients(monkeypatch):
    from rlhf_kernels.trainer import dpo, sft

    e = _minibatch()
    batch = {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"],
             "loss_mask": torch.cat([torch.zeros(3, 1), e["mask"]], 1).long()}  # fmt: skip
    _assert_same_gradients_either_way(monkeypatch, sft, "logprobs", lambda m: sft.sft_loss(m, batch)[0])
    _assert_same_gradients_either_way(monkeypatch, dpo, "logprobs",
                                      lambda m: sum(t.sum() for t in dpo.pair_logps(m, batch)))
