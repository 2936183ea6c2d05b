"""An interrupted run resumed from its checkpoint reproduces the uninterrupted run exactly."""
import os

import torch


def _losses(h, keys):
    return [[r[k] for k in keys] for r in h]


def test_sft_resume_is_exact(tmp_path, tiny):
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    kw = dict(tiny, steps=8, batch_size=16, n_train=300, ckpt_every=4)
    _, _, full = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "a")))
    _, _, part = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=5))
    assert len(part) == 5
    _, _, resumed = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert len(resumed) == 8
    assert _losses(resumed, ["loss", "grad_norm", "lr"]) == _losses(full, ["loss", "grad_norm", "lr"])


def test_rm_resume_is_exact(tmp_path, tiny, sft_run):
    from rlhf_kernels.trainer.reward import RMConfig, train_rm
    kw = dict(tiny, steps=6, batch_size=8, n_train=200, init=sft_run["dir"])
    *_, full, acc_full = train_rm(RMConfig(**kw, out_dir=str(tmp_path / "a")))
    train_rm(RMConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=3))
    *_, resumed, acc_res = train_rm(RMConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert _losses(resumed, ["loss", "acc"]) == _losses(full, ["loss", "acc"])
    assert acc_full == acc_res


def test_ppo_resume_is_exact(tmp_path, tiny, sft_run, rm_run):
    """Sampling RNG, optimizer moments, critic, adaptive KL coefficient all come back."""
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    kw = dict(tiny, sft=sft_run["dir"], rm=rm_run["dir"], steps=4, rollout_batch=16, ppo_epochs=2,
              minibatches=2, adaptive_kl=True, kl_target=0.5, eval_prompts=32)
    keys = ["proxy", "gold", "kl", "pg_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl_coef"]
    _, _, full, s_full = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "a")))
    _, _, part, _ = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=2))
    assert len(part) == 2
    _, _, resumed, s_res = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert _losses(resumed, keys) == _losses(full, keys)
    assert s_res["ppo_eval"] == s_full["ppo_eval"] and s_res["sft_eval"] == s_full["sft_eval"]


def test_checkpoint_writes_are_atomic_and_safe_to_load(tmp_path, tiny):
    from rlhf_kernels.trainer.checkpoint import latest_checkpoint
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    kw = dict(tiny, steps=4, batch_size=8, n_train=100, ckpt_every=2)
    out = tmp_path / "run"
    train_sft(SFTConfig(**kw, out_dir=str(out)))
    ck = latest_checkpoint(str(out))
    assert ck.endswith("step_000004")
    # a kill in the middle of the next save leaves a .tmp dir behind: `latest` still names a complete one
    os.makedirs(out / "ckpt" / "step_000006.tmp" / "policy")
    assert latest_checkpoint(str(out)) == ck
    assert os.path.isfile(os.path.join(ck, "policy", "model.safetensors"))
    # trainer state is plain tensors/containers: loadable with weights_only=True
    state = torch.load(os.path.join(ck, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 4 and "policy" in state["optimizers"]
    # only the last `keep` checkpoints are kept
    assert sorted(p for p in os.listdir(out / "ckpt") if p.startswith("step_") and not p.endswith(".tmp")) == \
        ["step_000002", "step_000004"]


def test_fused_head_sft_resume_is_exact_and_checkpoints_keep_hf_names(tmp_path, tiny):
    """--fused-head: stop + resume == straight run; the checkpoint holds the HF names (the same keys as a
    logits-mode one), so a fused checkpoint resumes in logits mode too (same run, to rounding)."""
    from safetensors.torch import load_file

    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    kw = dict(tiny, steps=6, batch_size=16, n_train=300)
    keys = ["loss", "grad_norm", "lr"]
    _, _, full = train_sft(SFTConfig(**kw, fused_head=True, out_dir=str(tmp_path / "a")))
    train_sft(SFTConfig(**kw, fused_head=True, out_dir=str(tmp_path / "b"), stop_after=3))
    _, _, resumed = train_sft(SFTConfig(**kw, fused_head=True, out_dir=str(tmp_path / "b"), resume=True))
    assert _losses(resumed, keys) == _losses(full, keys)
    train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "logits"), stop_after=3))
    names = {d: set(load_file(str(tmp_path / d / "ckpt" / "step_000003" / "policy" / "model.safetensors")))
             for d in ("b", "logits")}
    assert names["b"] == names["logits"] and not any(n.startswith("lm.") for n in names["b"])
    # the fused run's step-3 checkpoint (ckpt keeps the last 2: step 3 and step 6) resumed without --fused-head
    import shutil
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    (tmp_path / "c" / "ckpt" / "latest").write_text("step_000003")
    _, _, cross = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "c"), resume=True))
    torch.testing.assert_close(torch.tensor(_losses(cross, keys)), torch.tensor(_losses(full, keys)), rtol=1e-4,
                               atol=1e-6)


def test_fused_head_ppo_resume_is_exact(tmp_path, tiny, sft_run, rm_run):
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    kw = dict(tiny, sft=sft_run["dir"], rm=rm_run["dir"], steps=3, rollout_batch=16, ppo_epochs=2, minibatches=2,
              eval_prompts=16, kl_in_reward=False, kl_estimator="k3", entropy_coef=0.01, fused_head=True)
    keys = ["proxy", "gold", "kl", "pg_loss", "value_loss", "entropy", "clip_frac", "approx_kl"]
    _, _, full, s_full = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "a")))
    train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=2))
    _, _, resumed, s_res = train_ppo(PPOConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert _losses(resumed, keys) == _losses(full, keys)
    assert s_res["ppo_eval"] == s_full["ppo_eval"]
