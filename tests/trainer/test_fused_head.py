"""--fused-head (FusedHeadLM: log-probs and losses from hidden states + the LM head, no logits) against the
logits path, one process, float32: same losses, statistics, gradients and parameters after a step, for every
stage that touches the vocabulary head, on tiny random models of four architectures:

* GPT-2 (tied head, no bias), Llama (untied, no bias),
* Phi (an LM head *with* a bias: drop it in the wrapper and these fail),
* Granite (``logits_scaling``: logits / 4, folded into the temperature: forget it and these fail).

Distributed runs (DDP, FSDP2) are in test_distributed.py; resume in test_resume.py.
"""
import copy

import pytest
import torch

from rlhf_kernels.trainer.fused_head import FusedHeadLM

V, B, T = 67, 4, 12
TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the trainer suite's runs use (2 threads on a shared 2-core machine stall)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(arch):
    import transformers as tf
    torch.manual_seed(0)
    common = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 2}
    if arch == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if arch == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**common, num_key_value_heads=1))
    if arch == "phi":
        m = tf.PhiForCausalLM(tf.PhiConfig(**common, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
        with torch.no_grad():
            m.lm_head.bias.normal_()   # initialised to zeros: a dropped bias would go unseen in the forward
        return m
    if arch == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**common, num_key_value_heads=1, logits_scaling=4.0))
    raise ValueError(arch)


ARCHS = ("gpt2", "llama", "phi", "granite")


def _batch(seed=0):
    """Left-padded prompts, right-padded responses: [B, T] ids, attention mask and response (loss) mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :2] = 0            # left padding
    attn[2, 9:] = 0            # right padding
    attn[3, :1] = 0
    attn[3, 10:] = 0
    loss = torch.zeros_like(ids)
    loss[:, 5:] = 1
    loss = loss * attn
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def _sft_batch(seed=0):
    """Right-padded rows, as ``collate_sft`` builds them (positions 0.. on every real token)."""
    batch = _batch(seed)
    attn = torch.ones_like(batch["attention_mask"])
    attn[2, 9:] = 0
    attn[3, 10:] = 0
    loss = torch.zeros_like(attn)
    loss[:, 5:] = 1
    return {"input_ids": batch["input_ids"], "attention_mask": attn, "loss_mask": loss * attn}


def _pair(model):
    """(logits-mode model, fused-head model) with the same weights."""
    return copy.deepcopy(model), FusedHeadLM(copy.deepcopy(model))


def _grads(m):
    m = getattr(m, "lm", m)
    return {n: p.grad for n, p in m.named_parameters()}


def _assert_same(got: dict, want: dict, what):
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert w is not None and got[k] is not None, f"{what} {k}: no gradient"
        torch.testing.assert_close(got[k], w, **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, _tiny(request.param)


def test_sft_loss_and_gradients_match(arch_model):
    from rlhf_kernels.trainer.sft import sft_loss
    arch, model = arch_model
    a, f = _pair(model)
    batch = _sft_batch()
    (la, na), (lf, nf) = sft_loss(a, batch), sft_loss(f, batch)
    la.backward()
    lf.backward()
    assert na == nf and na > 0
    torch.testing.assert_close(lf, la, **TOL)
    _assert_same(_grads(f), _grads(a), f"{arch} sft grad")
    if arch == "phi":
        assert f.lm.lm_head.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scoring_logprobs_and_entropy_match(arch_model, temperature):
    from rlhf_kernels.trainer.rollout import sequence_logprobs
    _, model = arch_model
    a, f = _pair(model)
    batch = _batch(1)
    with torch.no_grad():
        lp_a, ent_a = sequence_logprobs(a, batch, temperature, return_entropy=True)
        lp_f, ent_f = sequence_logprobs(f, batch, temperature, return_entropy=True)
        only = sequence_logprobs(f, batch, temperature)
    assert lp_f.shape == (B, T - 1) and lp_f.dtype == torch.float32
    torch.testing.assert_close(lp_f, lp_a, **TOL)
    torch.testing.assert_close(ent_f, ent_a, **TOL)
    torch.testing.assert_close(only, lp_f, rtol=0, atol=0)
    assert (lp_a[~_batch(1)["loss_mask"][:, 1:].bool()] == 0).all()


def _experience(model, temperature, seed=0):
    """A fixed off-policy minibatch (old / ref log-probs perturbed so ratios leave the clip range)."""
    from rlhf_kernels.trainer.data import shifted_targets
    from rlhf_kernels.trainer.rollout import sequence_logprobs
    batch = _batch(seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = batch["loss_mask"][:, 1:].float()
    with torch.no_grad():
        logp = sequence_logprobs(model, batch, temperature)
    noise = lambda s: s * torch.randn(B, T - 1, generator=g) * mask
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "targets": shifted_targets(batch["input_ids"], batch["loss_mask"]), "mask": mask,
            "old_logp": logp + noise(0.3), "ref_logp": logp + noise(0.5), "values": noise(1.0),
            "adv": noise(1.0), "returns": noise(1.0)}


PPO_VARIANTS = {
    "kl-in-reward": {"kl_in_reward": True, "loss_agg": "token-mean", "temperature": 1.0},
    "kl-loss-entropy": {"kl_in_reward": False, "kl_estimator": "k3", "entropy_coef": 0.01,
                        "loss_agg": "seq-mean-token-sum-norm", "temperature": 0.7},
}


@pytest.mark.parametrize("variant", list(PPO_VARIANTS))
def test_ppo_update_matches(arch_model, variant):
    """ppo_update (policy + value model, 2 epochs x 2 minibatches, SGD): statistics and both models."""
    from rlhf_kernels.trainer.models import ScalarHeadModel
    from rlhf_kernels.trainer.ppo import PPOConfig, ppo_update
    arch, model = arch_model
    cfg = PPOConfig(device="cpu", rollout_batch=B, ppo_epochs=2, minibatches=2, kl_coef=0.1, **PPO_VARIANTS[variant])
    exp = _experience(model, cfg.temperature)
    critic = ScalarHeadModel.from_causal_lm(model)
    results = []
    for fused in (False, True):
        policy = copy.deepcopy(model)
        actor, c = FusedHeadLM(policy) if fused else policy, copy.deepcopy(critic)
        opt, copt = torch.optim.SGD(policy.parameters(), lr=0.5), torch.optim.SGD(c.parameters(), lr=0.5)
        torch.manual_seed(3)   # the same minibatch order
        stats = ppo_update(cfg, actor, c, opt, copt, exp, cfg.kl_coef)
        results.append((stats, dict(policy.named_parameters()), dict(c.named_parameters())))
    (s_a, p_a, c_a), (s_f, p_f, c_f) = results
    assert s_a.keys() == s_f.keys()
    for k in s_a:
        assert s_f[k] == pytest.approx(s_a[k], rel=1e-5, abs=1e-6), k
    assert s_a["clip_frac"] > 0   # the clip is active, so its sub-gradients are compared too
    _assert_same({k: v.detach() for k, v in p_f.items()}, {k: v.detach() for k, v in p_a.items()}, f"{arch} policy")
    _assert_same({k: v.detach() for k, v in c_f.items()}, {k: v.detach() for k, v in c_a.items()}, f"{arch} critic")


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_grpo_update_matches(arch_model, loss_type):
    from rlhf_kernels.trainer.grpo import GRPOConfig, grpo_update
    arch, model = arch_model
    cfg = GRPOConfig(device="cpu", prompts_per_step=2, num_generations=2, ppo_epochs=2, minibatches=1,
                     loss_type=loss_type, beta=0.1, entropy_coef=0.01, temperature=0.8)
    exp = _experience(model, cfg.temperature, seed=4)
    out = []
    for fused in (False, True):
        policy = copy.deepcopy(model)
        torch.manual_seed(3)
        stats = grpo_update(cfg, FusedHeadLM(policy) if fused else policy,
                            torch.optim.SGD(policy.parameters(), lr=0.5), exp)
        out.append((stats, {k: v.detach() for k, v in policy.named_parameters()}))
    (s_a, p_a), (s_f, p_f) = out
    for k in s_a:
        assert s_f[k] == pytest.approx(s_a[k], rel=1e-5, abs=1e-6), k
    _assert_same(p_f, p_a, f"{arch} {loss_type} policy")


def test_dpo_sequence_logprobs_and_gradients_match(arch_model):
    from rlhf_kernels.trainer.dpo import pair_logps
    arch, model = arch_model
    a, f = _pair(model)
    batch = _batch(2)
    (ca, ra), (cf, rf) = pair_logps(a, batch), pair_logps(f, batch)
    torch.testing.assert_close(cf, ca, **TOL)
    torch.testing.assert_close(rf, ra, **TOL)
    ((ca - 2 * ra).sum()).backward()
    ((cf - 2 * rf).sum()).backward()
    _assert_same(_grads(f), _grads(a), f"{arch} dpo grad")


def test_generate_goes_through_the_hf_model():
    """The same sampled tokens as lm.generate under the same seed (the wrapper only routes the call)."""
    from rlhf_kernels.trainer.models import ByteTokenizer
    from rlhf_kernels.trainer.rollout import SamplingConfig, generate_responses
    model = _tiny("gpt2")
    model.resize_token_embeddings(258)
    tok = ByteTokenizer()
    rows = [{"prompt": "abc:"}, {"prompt": "hello:"}]
    out = []
    for m in (model, FusedHeadLM(model)):
        torch.manual_seed(0)
        out.append(generate_responses(m, tok, rows, SamplingConfig(max_new_tokens=5), "cpu", 32)["input_ids"])
    assert torch.equal(out[0], out[1])


def test_whole_sft_and_dpo_runs_match(tmp_path, tiny, sft_run):
    """train_sft / train_dpo end to end (AdamW, scheduler, saving): histories and saved weights, both modes."""
    from safetensors.torch import load_file

    from rlhf_kernels.trainer.dpo import DPOConfig, train_dpo
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    runs = {}
    for fused in (False, True):
        d = tmp_path / str(fused)
        _, _, h_sft = train_sft(SFTConfig(**tiny, out_dir=str(d / "sft"), steps=3, batch_size=8, n_train=64,
                                          fused_head=fused))
        _, _, h_dpo, _ = train_dpo(DPOConfig(**tiny, out_dir=str(d / "dpo"), sft=sft_run["dir"], task="letters-easy",
                                             steps=3, batch_size=8, n_train=80, eval_prompts=0, fused_head=fused))
        runs[fused] = (h_sft, h_dpo, d)
    for i, keys in ((0, ("loss", "grad_norm")), (1, ("loss", "margin", "grad_norm"))):
        for k in keys:
            torch.testing.assert_close(torch.tensor([r[k] for r in runs[True][i]]),
                                       torch.tensor([r[k] for r in runs[False][i]]), rtol=1e-4, atol=1e-6, msg=k)
    for stage in ("sft", "dpo"):
        a = load_file(str(runs[False][2] / stage / "final" / "model.safetensors"))
        b = load_file(str(runs[True][2] / stage / "final" / "model.safetensors"))
        assert a.keys() == b.keys()   # the HF names: no "lm." prefix from the wrapper
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_flag_and_unsupported_heads_are_clear():
    import transformers as tf

    from rlhf_kernels.trainer.config import make_config, parse_flags
    from rlhf_kernels.trainer.ppo import PPOConfig
    file, flags = parse_flags(["--fused-head", "--steps", "3"])
    assert make_config(PPOConfig, file, flags).fused_head is True
    assert PPOConfig().fused_head is False
    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        FusedHeadLM(gemma)
    with pytest.raises(ValueError, match="op must be one of"):
        FusedHeadLM(_tiny("gpt2"))(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), op="logits")
