"""Each stage runs a few steps on a tiny model and learns."""
import statistics

import torch

from rlhf_kernels.tasks import get_task


def _mean(h, k, sl):
    return statistics.mean(r[k] for r in h[sl])


def test_sft_loss_goes_down(sft_run):
    h = sft_run["history"]
    assert len(h) == 300
    assert _mean(h, "loss", slice(-5, None)) < 0.8 * _mean(h, "loss", slice(0, 5))
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in h)


def test_sft_masks_prompt_tokens(sft_run):
    """The loss covers response tokens only: changing the prompt's next-token targets changes nothing."""
    from rlhf_kernels.trainer.data import collate_sft, shifted_targets
    tok = sft_run["tok"]
    b = collate_sft([{"prompt": "abcde:", "response": "aab"}], tok)
    t = shifted_targets(b["input_ids"], b["loss_mask"])
    assert t[0].tolist() == [-100] * 5 + [ord("a"), ord("a"), ord("b"), tok.eos_id]


def test_reward_model_learns_and_beats_chance(rm_run):
    h = rm_run["history"]
    assert _mean(h, "loss", slice(-10, None)) < _mean(h, "loss", slice(0, 10))
    assert rm_run["acc"] > 0.7  # held-out pairs, 480 of them; chance is 0.5


def test_reward_model_reads_last_non_pad_token(rm_run):
    from rlhf_kernels.trainer.data import collate_pairs
    from rlhf_kernels.trainer.models import ScalarHeadModel, load_tokenizer
    rm = ScalarHeadModel.from_pretrained(rm_run["dir"]).eval()
    tok = load_tokenizer(rm_run["dir"])
    rows = [{"prompt": "abcde:", "chosen": "abcabcab", "rejected": "zz"}]
    b = collate_pairs(rows, tok)
    with torch.no_grad():
        s = rm.score(b["input_ids"], b["attention_mask"])
        # the short (right-padded) sequence scored alone, unpadded, gives the same reward
        ids = b["input_ids"][1:, : int(b["attention_mask"][1].sum())]
        alone = rm.score(ids, torch.ones_like(ids))
        # and left-padded too
        left = torch.cat([torch.full((1, 3), tok.pad_id), ids], 1)
        lmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
        left_s = rm.score(left, lmask)
    torch.testing.assert_close(s[1:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(left_s, alone, rtol=1e-5, atol=1e-5)


def test_ppo_raises_gold_reward_above_sft(tmp_path, tiny, sft_run, rm_run):
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    # the smoke config: the RM never saw a response cut off without EOS, so those get a large penalty
    cfg = PPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], rm=rm_run["dir"], task="letters-easy",
                    steps=25, rollout_batch=32, ppo_epochs=2, minibatches=2, lr=1e-3, kl_coef=0.05,
                    max_new_tokens=12, missing_eos_penalty=10.0, eval_prompts=256)
    policy, tok, hist, summary = train_ppo(cfg)
    print(f"RM acc {rm_run['acc']:.3f}; gold SFT {summary['sft_eval']['gold']:.3f} -> PPO {summary['ppo_eval']['gold']:.3f}")
    assert len(hist) == 25
    for k in ("proxy", "gold", "kl", "entropy", "clip_frac", "approx_kl", "value_loss", "tokens_per_s", "peak_mem_mb"):
        assert all(torch.isfinite(torch.tensor(r[k])) for r in hist), k
    assert _mean(hist, "proxy", slice(-5, None)) > _mean(hist, "proxy", slice(0, 5))
    assert summary["ppo_eval"]["n"] == 256
    assert summary["ppo_eval"]["gold"] > summary["sft_eval"]["gold"] + 0.06, summary
    assert summary["final_kl"] > 0


def test_ppo_kl_as_loss_term_and_adaptive_kl(tmp_path, tiny, sft_run, rm_run):
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    cfg = PPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], rm=rm_run["dir"], steps=3,
                    rollout_batch=16, ppo_epochs=1, minibatches=2, kl_in_reward=False, kl_estimator="k2",
                    adaptive_kl=True, kl_target=0.01, eval_prompts=0, top_k=5, top_p=0.9)
    _, _, hist, summary = train_ppo(cfg)
    assert len(hist) == 3 and "sft_eval" not in summary
    assert hist[-1]["kl_coef"] != cfg.kl_coef  # the controller moved it


def test_ppo_run_is_the_same_with_models_passed_or_loaded(tmp_path, tiny, sft_run, rm_run):
    """Sampling is seeded per step: a reward model loaded from ``rm=`` (whose fresh head draws from the global RNG
    before its weights are loaded) and the same model passed in give the same rollouts, losses and values. Before,
    the demo (models passed in) and ``rlhf-kernels ppo`` (paths) sampled differently from the same weights."""
    from rlhf_kernels.trainer.models import ScalarHeadModel, load_policy
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    kw = dict(tiny, sft=sft_run["dir"], rm=rm_run["dir"], steps=2, rollout_batch=16, ppo_epochs=1, minibatches=2,
              eval_prompts=0)
    keys = ["proxy", "gold", "kl", "pg_loss", "value_loss", "entropy", "resp_len"]
    _, _, loaded, _ = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "a")))
    policy, tok = load_policy(sft_run["dir"])
    rm = ScalarHeadModel.from_pretrained(rm_run["dir"])
    _, _, passed, _ = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "b")), policy=policy, tok=tok, rm=rm)
    assert [[r[k] for k in keys] for r in passed] == [[r[k] for k in keys] for r in loaded]


def test_rollout_masks_after_eos(sft_run):
    from rlhf_kernels.trainer.rollout import SamplingConfig, generate_responses
    tok = sft_run["tok"]
    torch.manual_seed(0)
    b = generate_responses(sft_run["model"], tok, get_task().prompts(32, 1), SamplingConfig(max_new_tokens=12), "cpu")
    P = b["prompt_len"]
    resp, m = b["input_ids"][:, P:], b["loss_mask"][:, P:]
    for r, mm, has in zip(resp, m, b["has_eos"]):
        n = int(mm.sum())
        assert mm[:n].all() and not mm[n:].any()          # contiguous
        assert (r[n:] == tok.pad_id).all()
        if has:
            assert r[n - 1] == tok.eos_id and (r[: n - 1] != tok.eos_id).all()
        else:
            assert n == 12
