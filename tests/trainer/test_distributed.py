"""torchrun with 2 gloo ranks on the CPU against one process on the same global batch:

* PPO updates (policy + critic) under DDP and FSDP2 give the same losses and parameters;
* GRPO updates under FSDP2 (DDP: test_grpo.py) and whole DPO runs under FSDP2 (DDP: test_dpo.py) too;
* whole SFT and reward-model runs under DDP and FSDP2;
* advantage whitening uses the all-reduced mean and variance;
* a distributed PPO run stopped and resumed from its checkpoint repeats the uninterrupted run exactly,
  under DDP and under FSDP2 (rank-0 gathered checkpoints, every rank reloading its shard);
* a SIGTERM to one rank stops both after the same step, and the resumed DDP SFT run repeats the uninterrupted one;
* --fused-head (FusedHeadLM wrapped by DDP / sharded as the FSDP2 root): PPO updates and SFT runs match
  one fused process, an FSDP2 fused SFT run resumes exactly, and a whole FSDP2 fused PPO run (generation
  inside the root's forward, gathered checkpoints without the wrapper's prefix) matches the logits-mode run.

One launch runs every scenario (each rank pays a few seconds of imports); the tests compare what
rank 0 wrote with single-process runs. The ranks run this file as a script (``__main__`` below).
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # one torchrun launch of every scenario: ~35 s


def _fsdp2_missing() -> str | None:
    """Why FSDP2 cannot be tested here on the CPU (this torch has no ``fully_shard``, or one for CUDA only), or
    None."""
    from rlhf_kernels.trainer.distributed import _fully_shard
    try:
        _fully_shard(torch.device("cpu"))
    except ValueError as e:
        return str(e)
    return None


FSDP_SKIP = _fsdp2_missing()
PARALLEL = ("ddp",) + (() if FSDP_SKIP else ("fsdp",))
PPO_AGGS = ("token-mean", "seq-mean-token-sum")
FUSED_AGG = "seq-mean-token-sum"   # --fused-head update: a per-sequence loss_agg (global scale != token count)
GRPO_TYPES = ("grpo", "dr_grpo")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- shared by both sides
def _ppo_cfg(agg):
    from rlhf_kernels.trainer.ppo import PPOConfig
    return PPOConfig(device="cpu", task="letters-easy", rollout_batch=8, ppo_epochs=2, minibatches=1,
                     kl_in_reward=False, kl_estimator="k3", kl_coef=0.1, loss_agg=agg, max_new_tokens=10, max_len=32)


def _grpo_cfg(loss_type):
    from rlhf_kernels.trainer.grpo import GRPOConfig
    return GRPOConfig(device="cpu", task="letters-easy", prompts_per_step=4, num_generations=2, ppo_epochs=2,
                      loss_type=loss_type, beta=0.1, max_new_tokens=10, max_len=32)


def _models(spec):
    from rlhf_kernels.trainer.models import ScalarHeadModel, load_policy
    policy, _ = load_policy(spec["sft"])
    return policy, ScalarHeadModel.from_pretrained(spec["rm"])


def _full_state(model):
    """Full parameters on rank 0 (gathered from FSDP2 shards), by the HF names (a FusedHeadLM's ``lm``)."""
    from rlhf_kernels.trainer.distributed import model_state_dict
    sd = model_state_dict(model)
    return {k: v.clone() for k, v in (getattr(model, "lm", model).state_dict() if sd is None else sd).items()}


def _ppo_update(agg, policy, critic, exp, parallel="ddp", fused=False):
    from rlhf_kernels.trainer.distributed import wrap_model
    from rlhf_kernels.trainer.fused_head import FusedHeadLM
    from rlhf_kernels.trainer.ppo import ppo_update
    cfg = _ppo_cfg(agg)
    actor = FusedHeadLM(policy) if fused else policy
    model, vmodel = wrap_model(actor, parallel, CPU), wrap_model(critic, parallel, CPU)
    torch.manual_seed(1)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)   # SGD: parameters move by the gradient itself
    copt = torch.optim.SGD(critic.parameters(), lr=0.5)
    stats = ppo_update(cfg, model, vmodel, opt, copt, exp, cfg.kl_coef)
    return stats, _full_state(actor), _full_state(critic)


def _grpo_update(loss_type, policy, exp, parallel="ddp"):
    from rlhf_kernels.trainer.distributed import wrap_model
    from rlhf_kernels.trainer.grpo import grpo_update
    model = wrap_model(policy, parallel, CPU)
    torch.manual_seed(1)
    stats = grpo_update(_grpo_cfg(loss_type), model, torch.optim.SGD(policy.parameters(), lr=0.5), exp)
    return stats, _full_state(policy)


def _shard(exp, rank):
    """Uneven halves (rank 0: the 6 longest responses, rank 1: the 2 shortest), each trimmed to its own
    width: ranks hold different numbers of sequences, tokens and padded lengths, as in a real run."""
    order = exp["mask"].sum(1).argsort(descending=True, stable=True)
    e = {k: v[order[:6] if rank == 0 else order[6:]] for k, v in exp.items()}
    T = int(e["attention_mask"].any(0).nonzero().max()) + 1
    return {k: v[:, :T] if k in ("input_ids", "attention_mask") else v[:, :T - 1] for k, v in e.items()}


def _whiten_input():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 12, generator=g) * 3 + 1
    mask = (torch.rand(8, 12, generator=g) < 0.6).float()
    return x, mask


def _group_rewards():
    """12 rewards in groups of 4; the last 4 (rank 1's share) spread more widely, so a per-rank std would differ."""
    g = torch.Generator().manual_seed(6)
    return torch.randn(12, generator=g) * torch.tensor([1.0] * 8 + [4.0] * 4)


def _ppo_run_kw(spec):
    return dict(spec["tiny"], sft=spec["sft"], rm=spec["rm"], task="letters-easy", steps=3, rollout_batch=8,
                ppo_epochs=2, minibatches=2, adaptive_kl=True, kl_target=0.5, eval_prompts=16, max_new_tokens=8)


def _dpo_kw(spec):
    return dict(spec["tiny"], sft=spec["sft"], task="letters-easy", steps=4, batch_size=8, n_train=120, lr=1e-3,
                eval_prompts=0)


def _sft_kw(spec):
    return dict(spec["tiny"], task="letters-easy", steps=4, batch_size=8, n_train=64, lr=3e-3, warmup_steps=2)


def _rm_kw(spec):
    # center_coef > 0: the Bradley-Terry loss alone gives a shift of every reward (ln_f.bias, head.bias) zero
    # gradient, and Adam would turn its rounding noise into ~lr-sized, run-dependent steps
    return dict(spec["tiny"], init=spec["sft"], task="letters-easy", steps=4, batch_size=8, n_train=80, lr=1e-3,
                eval_frac=0.2, center_coef=0.01)


# ----------------------------------------------------------------------------- the launch
@pytest.fixture(scope="module")
def dist_run(tmp_path_factory, tiny, sft_run, rm_run):
    """Fixed rollout batches built here, then one torchrun launch of every scenario; returns its out dir."""
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer.grpo import make_group_experience
    from rlhf_kernels.trainer.ppo import make_experience
    out = tmp_path_factory.mktemp("dist")
    spec = {"sft": sft_run["dir"], "rm": rm_run["dir"], "tiny": tiny, "out": str(out), "parallel": list(PARALLEL)}
    (out / "spec.json").write_text(json.dumps(spec))
    task = get_task("letters-easy")
    policy, rm = _models(spec)
    from rlhf_kernels.trainer.models import load_tokenizer
    tok = load_tokenizer(spec["sft"])
    ref = copy.deepcopy(policy).eval()
    torch.manual_seed(0)
    cfg = _ppo_cfg("token-mean")
    exp, _ = make_experience(cfg, policy, ref, copy.deepcopy(rm), rm, tok, task.prompts(8, 3), cfg.kl_coef, CPU, task)
    torch.save(exp, out / "ppo_exp.pt")
    exp, _ = make_group_experience(_grpo_cfg("grpo"), policy, ref, None, tok, task.prompts(4, 3), CPU, task)
    torch.save(exp, out / "grpo_exp.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), str(out / "spec.json")], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def _assert_same_params(got, want, msg, rtol=1e-4, atol=1e-6):
    assert set(got) >= set(want) - {"lm_head.weight"}, msg
    for name, p in want.items():
        if name in got:
            torch.testing.assert_close(got[name], p, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{msg} {n}: {m}")


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    FSDP_SKIP is not None, reason=str(FSDP_SKIP)))])
@pytest.mark.parametrize("agg", PPO_AGGS)
def test_ppo_update_two_ranks_match_one_process(dist_run, parallel, agg):
    """Policy loss, value loss, and both models' parameters after 2 epochs (the second one clips)."""
    spec = json.loads((dist_run / "spec.json").read_text())
    policy, critic = _models(spec)
    stats, p_want, c_want = _ppo_update(agg, policy, critic, torch.load(dist_run / "ppo_exp.pt", weights_only=True))
    got = torch.load(dist_run / f"ppo_{parallel}_{agg}.pt", weights_only=True)
    for k in ("pg_loss", "value_loss"):
        assert got["stats"][k] == pytest.approx(stats[k], rel=1e-4, abs=1e-6), k
    assert stats["clip_frac"] > 0 or stats["approx_kl"] > 0   # the second epoch really is off-policy
    _assert_same_params(got["policy"], p_want, f"{parallel} {agg} policy")
    _assert_same_params(got["critic"], c_want, f"{parallel} {agg} critic")


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    FSDP_SKIP is not None, reason=str(FSDP_SKIP)))])
def test_fused_head_ppo_update_two_ranks_match_one_process(dist_run, parallel):
    """--fused-head: rk.linear_ppo_loss inside the wrapper's forward, through DDP / the FSDP2 root."""
    spec = json.loads((dist_run / "spec.json").read_text())
    policy, critic = _models(spec)
    exp = torch.load(dist_run / "ppo_exp.pt", weights_only=True)
    stats, p_want, c_want = _ppo_update(FUSED_AGG, policy, critic, exp, fused=True)
    got = torch.load(dist_run / f"ppo_fused_{parallel}.pt", weights_only=True)
    for k in ("pg_loss", "value_loss"):
        assert got["stats"][k] == pytest.approx(stats[k], rel=1e-4, abs=1e-6), k
    assert not any(k.startswith("lm.") for k in got["policy"])   # HF names, without the wrapper's prefix
    _assert_same_params(got["policy"], p_want, f"fused {parallel} policy")
    _assert_same_params(got["critic"], c_want, f"fused {parallel} critic")


def test_whitening_uses_global_statistics(dist_run):
    from rlhf_kernels.trainer.ppo import masked_whiten
    x, mask = _whiten_input()
    want = masked_whiten(x, mask)
    got = torch.load(dist_run / "whiten.pt", weights_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batch_scaled_group_advantages_use_global_statistics(dist_run):
    """GRPO's ``scale_rewards: batch`` under torchrun: every rank scales its groups by the std of all ranks'
    rewards (the all-reduced count, sum and sum of squares), as one process does with all of them."""
    from rlhf_kernels.trainer.grpo import group_advantages
    rewards = _group_rewards()
    want = group_advantages(rewards, 4, "batch")
    got = torch.load(dist_run / "batch_advantages.pt", weights_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(group_advantages(rewards[:8], 4, "batch"), want[:8], rtol=1e-2)   # a rank's own std


@pytest.mark.skipif(FSDP_SKIP is not None, reason=str(FSDP_SKIP))
@pytest.mark.parametrize("loss_type", GRPO_TYPES)
def test_grpo_fsdp_update_matches_one_process(dist_run, loss_type):
    spec = json.loads((dist_run / "spec.json").read_text())
    policy, _ = _models(spec)
    stats, want = _grpo_update(loss_type, policy, torch.load(dist_run / "grpo_exp.pt", weights_only=True))
    got = torch.load(dist_run / f"grpo_fsdp_{loss_type}.pt", weights_only=True)
    assert got["stats"]["pg_loss"] == pytest.approx(stats["pg_loss"], rel=1e-4, abs=1e-6)
    _assert_same_params(got["policy"], want, f"fsdp {loss_type}")


def _assert_same_saved_model(got_dir, want_dir, n_embd, lr):
    """Every tensor of every ``*.safetensors`` file saved in the two dirs (AdamW runs)."""
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(want_dir) if f.endswith(".safetensors"))
    assert files and files == sorted(f for f in os.listdir(got_dir) if f.endswith(".safetensors"))
    E = n_embd
    for f in files:
        a, b = load_file(os.path.join(want_dir, f)), load_file(os.path.join(got_dir, f))
        assert set(a) == set(b), f
        for name in a:
            x, y = b[name], a[name]
            if name.endswith("attn.c_attn.bias"):
                # the key bias has zero true gradient (softmax is shift-invariant): Adam divides rounding noise
                # by its own size and moves it by up to ~lr per step in either run; compare it loosely
                torch.testing.assert_close(x[E:2 * E], y[E:2 * E], rtol=0, atol=4 * lr)
                x, y = torch.cat([x[:E], x[2 * E:]]), torch.cat([y[:E], y[2 * E:]])
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m, n=f"{f} {name}": f"{n}: {m}")


def _assert_same_history(two, one, keys):
    for k in keys:
        torch.testing.assert_close(torch.tensor([r[k] for r in two]), torch.tensor([r[k] for r in one]),
                                   rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(FSDP_SKIP is not None, reason=str(FSDP_SKIP))
def test_dpo_fsdp_run_matches_one_process(dist_run, tmp_path):
    """Whole runs (AdamW, scheduler, final save gathered from the shards) against one process."""
    from rlhf_kernels.trainer.dpo import DPOConfig, train_dpo
    spec = json.loads((dist_run / "spec.json").read_text())
    kw = _dpo_kw(spec)
    _, _, one, _ = train_dpo(DPOConfig(**kw, out_dir=str(tmp_path / "one")))
    two = json.loads((dist_run / "dpo_fsdp.json").read_text())
    _assert_same_history(two, one, ("loss", "margin", "acc", "grad_norm"))
    _assert_same_saved_model(dist_run / "dpo_fsdp" / "final", tmp_path / "one" / "final", kw["n_embd"], kw["lr"])


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    FSDP_SKIP is not None, reason=str(FSDP_SKIP)))])
def test_sft_and_rm_runs_match_one_process(dist_run, tmp_path, parallel):
    """SFT (loss over the all-reduced token count) and the reward model (pairs split across ranks)."""
    from rlhf_kernels.trainer.reward import RMConfig, train_rm
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    spec = json.loads((dist_run / "spec.json").read_text())
    two = json.loads((dist_run / f"sft_rm_{parallel}.json").read_text())
    kw = _sft_kw(spec)
    _, _, one = train_sft(SFTConfig(**kw, out_dir=str(tmp_path / "sft")))
    _assert_same_history(two["sft"], one, ("loss", "grad_norm"))
    _assert_same_saved_model(dist_run / f"sft_{parallel}" / "final", tmp_path / "sft" / "final", kw["n_embd"], kw["lr"])
    kw = _rm_kw(spec)
    *_, one, acc = train_rm(RMConfig(**kw, out_dir=str(tmp_path / "rm")))
    _assert_same_history(two["rm"], one, ("loss", "acc", "margin", "grad_norm"))
    assert two["rm_acc"] == acc
    _assert_same_saved_model(dist_run / f"rm_{parallel}" / "final", tmp_path / "rm" / "final", kw["n_embd"], kw["lr"])


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    FSDP_SKIP is not None, reason=str(FSDP_SKIP)))])
def test_fused_head_sft_runs_match_one_process(dist_run, tmp_path, parallel):
    """--fused-head SFT (rk.linear_cross_entropy, gradient in the forward) on 2 ranks against one fused process;
    under FSDP2 also stopped after 2 steps and resumed (optimizer state by HF names) == the straight run."""
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    spec = json.loads((dist_run / "spec.json").read_text())
    two = json.loads((dist_run / f"sft_fused_{parallel}.json").read_text())
    kw = _sft_kw(spec)
    _, _, one = train_sft(SFTConfig(**kw, fused_head=True, out_dir=str(tmp_path / "sft")))
    _assert_same_history(two["full"], one, ("loss", "grad_norm"))
    _assert_same_saved_model(dist_run / f"sft_fused_{parallel}" / "final", tmp_path / "sft" / "final", kw["n_embd"],
                             kw["lr"])
    if parallel == "fsdp":
        keys = ("loss", "grad_norm", "lr")
        assert [[r[k] for k in keys] for r in two["resumed"]] == [[r[k] for k in keys] for r in two["full"]]


@pytest.mark.skipif(FSDP_SKIP is not None, reason=str(FSDP_SKIP))
def test_fused_head_fsdp_ppo_run_matches_logits_run(dist_run):
    """A whole 2-rank FSDP2 PPO run with --fused-head (sampling through the root's forward, scoring, updates,
    checkpoints) against the same run on logits (ppo_fsdp_a): same statistics and final weights, to rounding."""
    from rlhf_kernels.trainer.ppo import PPOConfig
    spec = json.loads((dist_run / "spec.json").read_text())
    res = json.loads((dist_run / "ppo_fused_fsdp.json").read_text())
    want = json.loads((dist_run / "ppo_resume_fsdp.json").read_text())
    _assert_same_history(res["history"], want["full"], ("proxy", "gold", "kl", "pg_loss", "value_loss", "entropy",
                                                        "clip_frac", "approx_kl", "kl_coef"))
    assert res["summary"]["ppo_eval"]["gold"] == pytest.approx(want["summary_full"]["ppo_eval"]["gold"], abs=1e-6)
    kw = _ppo_run_kw(spec)
    _assert_same_saved_model(dist_run / "ppo_fused_fsdp" / "final", dist_run / "ppo_fsdp_a" / "final", kw["n_embd"],
                             PPOConfig.lr)


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    FSDP_SKIP is not None, reason=str(FSDP_SKIP)))])
def test_distributed_ppo_resume_is_exact(dist_run, parallel):
    """2 ranks: 3 steps straight == 2 steps, checkpoint, resume for 1 (sampling, AdamW moments, critic, β)."""
    from rlhf_kernels.trainer.models import ScalarHeadModel, load_policy
    res = json.loads((dist_run / f"ppo_resume_{parallel}.json").read_text())
    keys = ["proxy", "gold", "kl", "pg_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl_coef"]
    full, resumed = res["full"], res["resumed"]
    assert len(full) == 3 and len(res["part"]) == 2
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    assert res["summary_resumed"]["ppo_eval"] == res["summary_full"]["ppo_eval"]
    # what rank 0 wrote is a complete, loadable model (gathered from the shards under FSDP2)
    a = load_policy(str(dist_run / f"ppo_{parallel}_a" / "final"))[0].state_dict()
    b = load_policy(str(dist_run / f"ppo_{parallel}_b" / "final"))[0].state_dict()
    _assert_same_params(b, a, parallel, rtol=0, atol=0)
    ck = dist_run / f"ppo_{parallel}_b" / "ckpt" / "step_000003" / "critic"
    assert ScalarHeadModel.from_pretrained(str(ck)).head.weight.shape[0] == 1


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resume_is_exact(dist_run):
    import signal
    seen = [json.loads((dist_run / f"sft_signal_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["stopped"] for s in seen] == [[2, int(signal.SIGTERM)]] * 2
    full = json.loads((dist_run / "sft_rm_ddp.json").read_text())["sft"]
    assert _losses(seen[0]["resumed"]) == _losses(full) and len(full) == 4


def _losses(history):
    return [[r[k] for k in ("step", "loss", "grad_norm", "lr")] for r in history]


def test_parallel_errors_are_clear(dist_run, tmp_path):
    """An unknown --parallel, and an FSDP2 checkpoint resumed without FSDP2, name the fix."""
    import shutil

    from rlhf_kernels.trainer.cli import main
    from rlhf_kernels.trainer.config import make_config
    from rlhf_kernels.trainer.ppo import PPOConfig, train_ppo
    with pytest.raises(ValueError, match=r"parallel must be one of \['ddp', 'fsdp'\]"):
        make_config(PPOConfig, None, {"parallel": "zero3"})
    assert main(["sft", "--parallel", "tp", "--out_dir", str(tmp_path / "x")]) == 2
    if FSDP_SKIP is None:
        spec = json.loads((dist_run / "spec.json").read_text())
        shutil.copytree(dist_run / "ppo_fsdp_b", tmp_path / "ppo")
        cfg = PPOConfig(**{**_ppo_run_kw(spec), "steps": 4}, resume=True, out_dir=str(tmp_path / "ppo"))
        with pytest.raises(ValueError, match=r"written with parallel fsdp; resume with the same --parallel"):
            train_ppo(cfg)


# ----------------------------------------------------------------------------- one rank
def _signal_scenario(spec, rank):
    """DDP SFT where only rank 1 gets a SIGTERM, inside step 2: both ranks must stop after step 2 (the checkpoint
    is a collective), then resume to the end. Each rank writes what it saw."""
    import dataclasses
    import signal

    from rlhf_kernels.trainer import sft
    from rlhf_kernels.trainer.interrupt import StoppedBySignal
    clip, calls = sft.clip_grad_norm, []

    def clip_then_signal(*args):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return clip(*args)

    cfg = sft.SFTConfig(**_sft_kw(spec), parallel="ddp", out_dir=os.path.join(spec["out"], "sft_signal"))
    sft.clip_grad_norm, stopped = clip_then_signal, None
    try:
        sft.train_sft(cfg)
    except StoppedBySignal as e:
        stopped = [e.step, e.signum]
    finally:
        sft.clip_grad_norm = clip
    _, _, resumed = sft.train_sft(dataclasses.replace(cfg, resume=True))
    Path(spec["out"], f"sft_signal_rank{rank}.json").write_text(json.dumps({"stopped": stopped, "resumed": resumed}))


def _rank_main(spec_path):
    import dataclasses

    import torch.distributed as dist

    from rlhf_kernels.trainer.distributed import dist_teardown
    from rlhf_kernels.trainer.ppo import PPOConfig, masked_whiten, train_ppo
    spec = json.loads(Path(spec_path).read_text())
    out = spec["out"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def save(obj, name):
        if rank == 0:
            torch.save(obj, os.path.join(out, name))

    x, mask = _whiten_input()
    rows = slice(0, 6) if rank == 0 else slice(6, 8)
    w = torch.zeros_like(x)
    w[rows] = masked_whiten(x[rows], mask[rows])
    dist.all_reduce(w)
    save(w, "whiten.pt")
    from rlhf_kernels.trainer.grpo import group_advantages
    rewards = _group_rewards()
    rows = slice(0, 8) if rank == 0 else slice(8, 12)   # unequal shares of whole groups
    a = torch.zeros_like(rewards)
    a[rows] = group_advantages(rewards[rows], 4, "batch")
    dist.all_reduce(a)
    save(a, "batch_advantages.pt")

    ppo_exp = torch.load(os.path.join(out, "ppo_exp.pt"), weights_only=True)
    grpo_exp = torch.load(os.path.join(out, "grpo_exp.pt"), weights_only=True)
    for parallel in spec["parallel"]:
        for agg in PPO_AGGS:
            policy, critic = _models(spec)
            stats, p, c = _ppo_update(agg, policy, critic, _shard(ppo_exp, rank), parallel)
            save({"stats": stats, "policy": p, "critic": c}, f"ppo_{parallel}_{agg}.pt")
            dist.barrier()
        policy, critic = _models(spec)
        stats, p, c = _ppo_update(FUSED_AGG, policy, critic, _shard(ppo_exp, rank), parallel, fused=True)
        save({"stats": stats, "policy": p, "critic": c}, f"ppo_fused_{parallel}.pt")
        dist.barrier()
    if "fsdp" in spec["parallel"]:
        for lt in GRPO_TYPES:
            policy, _ = _models(spec)
            stats, p = _grpo_update(lt, policy, _shard(grpo_exp, rank), "fsdp")
            save({"stats": stats, "policy": p}, f"grpo_fsdp_{lt}.pt")
        from rlhf_kernels.trainer.dpo import DPOConfig, train_dpo
        _, _, hist, _ = train_dpo(DPOConfig(**_dpo_kw(spec), parallel="fsdp", out_dir=os.path.join(out, "dpo_fsdp")))
        if rank == 0:
            Path(out, "dpo_fsdp.json").write_text(json.dumps(hist))
    from rlhf_kernels.trainer.reward import RMConfig, train_rm
    from rlhf_kernels.trainer.sft import SFTConfig, train_sft
    for parallel in spec["parallel"]:
        _, _, sft_hist = train_sft(SFTConfig(**_sft_kw(spec), parallel=parallel,
                                             out_dir=os.path.join(out, f"sft_{parallel}")))
        *_, rm_hist, acc = train_rm(RMConfig(**_rm_kw(spec), parallel=parallel, out_dir=os.path.join(out, f"rm_{parallel}")))
        if rank == 0:
            Path(out, f"sft_rm_{parallel}.json").write_text(json.dumps({"sft": sft_hist, "rm": rm_hist, "rm_acc": acc}))
        fused = SFTConfig(**_sft_kw(spec), parallel=parallel, fused_head=True)
        _, _, full = train_sft(dataclasses.replace(fused, out_dir=os.path.join(out, f"sft_fused_{parallel}")))
        resumed = None
        if parallel == "fsdp":
            r = dataclasses.replace(fused, out_dir=os.path.join(out, "sft_fused_fsdp_r"))
            train_sft(dataclasses.replace(r, stop_after=2))
            _, _, resumed = train_sft(dataclasses.replace(r, resume=True))
        if rank == 0:
            Path(out, f"sft_fused_{parallel}.json").write_text(json.dumps({"full": full, "resumed": resumed}))
    _signal_scenario(spec, rank)
    for parallel in spec["parallel"]:
        cfg = PPOConfig(**_ppo_run_kw(spec), parallel=parallel)
        _, _, full, s_full = train_ppo(dataclasses.replace(cfg, out_dir=os.path.join(out, f"ppo_{parallel}_a")))
        b = dataclasses.replace(cfg, out_dir=os.path.join(out, f"ppo_{parallel}_b"))
        _, _, part, _ = train_ppo(dataclasses.replace(b, stop_after=2))
        _, _, resumed, s_res = train_ppo(dataclasses.replace(b, resume=True))
        if rank == 0:
            Path(out, f"ppo_resume_{parallel}.json").write_text(json.dumps(
                {"full": full, "part": part, "resumed": resumed, "summary_full": s_full, "summary_resumed": s_res}))
    if "fsdp" in spec["parallel"]:
        cfg = PPOConfig(**_ppo_run_kw(spec), parallel="fsdp", fused_head=True, out_dir=os.path.join(out, "ppo_fused_fsdp"))
        _, _, hist, summ = train_ppo(cfg)
        if rank == 0:
            Path(out, "ppo_fused_fsdp.json").write_text(json.dumps({"history": hist, "summary": summ}))
    # leave together (see test_grpo's rank main), skipping the interpreter's teardown
    dist_teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _rank_main(sys.argv[1])
