import pytest
import torch

# a tiny model: the whole trainer suite has a CPU budget of a few minutes
TINY = dict(n_embd=32, n_layer=1, n_head=2, n_positions=32, max_len=32, progress=False, log_every=0, device="cpu",
            threads=1)


@pytest.fixture(scope="session")
def tiny():
    return dict(TINY)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny):
    """A briefly trained tiny SFT policy on the smoke variant of the task (shared by the RM / PPO tests)."""
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    out = tmp_path_factory.mktemp("sft")
    cfg = SFTConfig(**tiny, out_dir=str(out), steps=300, batch_size=32, lr=3e-3, n_train=4000,
                    task="letters-easy")
    model, tok, hist = train_sft(cfg)
    return {"dir": str(out / "final"), "history": hist, "model": model, "tok": tok}


@pytest.fixture(scope="session")
def rm_run(tmp_path_factory, tiny, sft_run):
    from rlhf_kernels.trainer.reward import RMConfig, train_rm
    out = tmp_path_factory.mktemp("rm")
    cfg = RMConfig(**tiny, out_dir=str(out), init=sft_run["dir"], steps=150, batch_size=32, lr=2e-3, task="letters-easy",
                   n_train=2400, eval_frac=0.2)
    rm, tok, hist, acc = train_rm(cfg)
    return {"dir": str(out / "final"), "history": hist, "acc": acc}


@pytest.fixture(scope="session")
def eval_models(sft_run, rm_run):
    """The trained policy, a reference perturbed away from it (so the KL is not 0), a critic perturbed away from the
    reward model, and the reward model, all in eval mode; for tests that recompute the trainer's steps by hand."""
    import copy

    from rlhf_kernels.trainer.models import ScalarHeadModel, load_policy
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def perturbed(model):
        copied = copy.deepcopy(model)
        for p in copied.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return copied

    policy, tok = load_policy(sft_run["dir"])
    rm = ScalarHeadModel.from_pretrained(rm_run["dir"])
    ref, critic = perturbed(policy), perturbed(rm)
    return [m.eval() for m in (policy, ref, critic, rm)], tok


@pytest.fixture(scope="session")
def oracle_logprobs():
    """``oracle_logprobs(model, roll, temperature)``: float64 log-probs [B, T-1] of a rollout's response tokens
    (``reference.logprobs`` on the model's logits; 0 off the response), written here rather than through the
    trainer's own ``shifted_targets`` / ``sequence_logprobs``."""
    from rlhf_kernels import reference
    from rlhf_kernels.trainer.models import lm_logits

    @torch.no_grad()
    def logprobs(model, roll, temperature):
        ids, on_response = roll["input_ids"], roll["loss_mask"][:, 1:].bool()
        targets = torch.where(on_response, ids[:, 1:], -100)
        logits = lm_logits(model, ids, roll["attention_mask"])[:, :-1].double()
        return reference.logprobs(logits, targets, temperature=temperature)
    return logprobs


@pytest.fixture
def record_rollouts(monkeypatch):
    """``record_rollouts(module)`` wraps ``module.generate_responses`` for the test and returns the list that every
    rollout it produces is appended to, so that a test can recompute by hand what the trainer did with them."""
    def record(module):
        rolls, generate = [], module.generate_responses

        def recording(*args, **kwargs):
            rolls.append(generate(*args, **kwargs))
            return rolls[-1]
        monkeypatch.setattr(module, "generate_responses", recording)
        return rolls
    return record
