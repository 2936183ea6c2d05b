"""GRPO: group advantages, loss-aggregation mapping, config errors, a smoke run that learns, exact resume."""
import statistics

import pytest
import torch

from rlhf_kernels.trainer.config import make_config
from rlhf_kernels.trainer.grpo import GRPOConfig, group_advantages, train_grpo


def _mean(h, k, sl):
    return statistics.mean(r[k] for r in h[sl])


def test_group_advantages_match_hand_computation():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0])   # 3 groups of 2
    eps = 1e-4
    # group: (r - group mean) / (unbiased group std + eps)
    s = 2 ** -0.5  # std of two values 1 apart (unbiased): |a-b|/sqrt(2)
    exp_group = [0.5 / (s + eps), -0.5 / (s + eps), 0.0, 0.0, -1.0 / (2 * s + eps), 1.0 / (2 * s + eps)]
    torch.testing.assert_close(group_advantages(r, 2, "group"), torch.tensor(exp_group))
    # batch: group-centred, scaled by the std of the whole batch
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0, -1.0, 1.0])
    torch.testing.assert_close(group_advantages(r, 2, "batch"), centred / (statistics.stdev(r.tolist()) + eps))
    # none: centred only (Dr. GRPO)
    torch.testing.assert_close(group_advantages(r, 2, "none"), centred)
    # a group with equal rewards gives zero advantage, not NaN
    assert group_advantages(torch.ones(4), 4, "group").abs().max() == 0
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(r, 2, "global")


@pytest.mark.parametrize("loss_type, agg, clip_high", [
    ("grpo", "seq-mean-token-mean", 0.2), ("bnpo", "token-mean", 0.2),
    ("dr_grpo", "seq-mean-token-sum-norm", 0.2), ("dapo", "token-mean", 0.28)])
def test_loss_type_maps_to_ppo_loss_agg(monkeypatch, tmp_path, tiny, sft_run, loss_type, agg, clip_high):
    import rlhf_kernels as rk
    seen = []
    real = rk.ppo_loss

    def spy(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(rk, "ppo_loss", spy)
    cfg = GRPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], task="letters-easy", steps=1,
                     prompts_per_step=2, num_generations=2, loss_type=loss_type, beta=0.04, eval_prompts=0)
    assert cfg.loss_agg == agg and cfg.clip_hi == clip_high
    train_grpo(cfg)
    kw = seen[0]
    assert (kw["loss_agg"], kw["clip_low"], kw["clip_high"]) == (agg, 0.2, clip_high)
    assert kw["kl_coef"] == 0.04 and kw["kl_estimator"] == "k3" and kw["ref_logp"] is not None


@pytest.mark.parametrize("values, match", [
    ({"loss_type": "ppo"}, r"loss_type must be one of"),
    ({"scale_rewards": "global"}, r"scale_rewards must be one of"),
    ({"reward": "human"}, r"reward must be 'gold' or 'rm'"),
    ({"num_generations": 1}, r"num_generations must be >= 2"),
    ({"loss_type": "dapo", "clip_high": 0.2}, r"dapo' needs clip_high > clip_low"),
    ({"prompts_per_step": 3, "num_generations": 3, "minibatches": 2}, r"divisible by minibatches"),
    ({"beta": -0.1}, r"beta must be >= 0"),
    ({"clip_low": 1.5}, r"clip_low"),
])
def test_bad_grpo_config_is_a_clear_error(values, match):
    with pytest.raises(ValueError, match=match):
        make_config(GRPOConfig, None, values)


def test_grpo_missing_inputs_are_clear_errors(tmp_path, capsys, sft_run):
    with pytest.raises(ValueError, match="--sft"):
        train_grpo(GRPOConfig(out_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="--rm"):
        train_grpo(GRPOConfig(out_dir=str(tmp_path), sft=sft_run["dir"], reward="rm"))
    from rlhf_kernels.trainer.cli import main
    assert main(["grpo", "--loss_type", "nope"]) == 2
    assert "loss_type must be one of" in capsys.readouterr().err
    assert main(["grpo", "--help"]) == 0 and "scale_rewards" in capsys.readouterr().out


def test_grpo_raises_gold_reward_above_sft(tmp_path, tiny, sft_run):
    cfg = GRPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], task="letters-easy", steps=20,
                     prompts_per_step=8, num_generations=4, lr=1e-3, max_new_tokens=12, missing_eos_penalty=1.0,
                     eval_prompts=256)
    _, _, hist, summary = train_grpo(cfg)
    print(f"gold SFT {summary['sft_eval']['gold']:.3f} -> GRPO {summary['grpo_eval']['gold']:.3f}, "
          f"KL {summary['final_kl']:.2f}")
    assert len(hist) == 20
    for k in ("gold", "reward", "kl", "entropy", "clip_frac", "approx_kl", "pg_loss", "tokens_per_s", "peak_mem_mb"):
        assert all(torch.isfinite(torch.tensor(r[k])) for r in hist), k
    assert _mean(hist, "gold", slice(-5, None)) > _mean(hist, "gold", slice(0, 5))
    assert summary["grpo_eval"]["gold"] > summary["sft_eval"]["gold"] + 0.06, summary
    assert summary["final_kl"] > 0


def test_grpo_rm_reward_dr_grpo_multi_epoch(tmp_path, tiny, sft_run, rm_run):
    """RM reward, Dr. GRPO (no std scaling), 2 epochs × 2 minibatches: the ratio moves off 1, so clipping acts."""
    cfg = GRPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], reward="rm", rm=rm_run["dir"],
                     task="letters-easy", steps=3, prompts_per_step=4, num_generations=4, ppo_epochs=2,
                     minibatches=2, lr=3e-3, loss_type="dr_grpo", scale_rewards="none", beta=0.1, eval_prompts=0)
    _, _, hist, summary = train_grpo(cfg)
    assert len(hist) == 3 and "grpo_eval" not in summary
    assert all(torch.isfinite(torch.tensor(r["reward"])) for r in hist)
    assert max(r["approx_kl"] for r in hist) > 0


def test_grpo_resume_is_exact(tmp_path, tiny, sft_run):
    kw = dict(tiny, sft=sft_run["dir"], task="letters-easy", steps=4, prompts_per_step=4, num_generations=3,
              ppo_epochs=2, minibatches=2, beta=0.05, eval_prompts=32)
    keys = ["gold", "reward", "kl", "pg_loss", "entropy", "clip_frac", "approx_kl"]
    _, _, full, s_full = train_grpo(GRPOConfig(**kw, out_dir=str(tmp_path / "a")))
    _, _, part, _ = train_grpo(GRPOConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=2))
    assert len(part) == 2
    _, _, resumed, s_res = train_grpo(GRPOConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    assert s_res["grpo_eval"] == s_full["grpo_eval"] and s_res["sft_eval"] == s_full["sft_eval"]


# ----------------------------------------------------------------------------- DDP (torchrun, gloo on CPU)
def _fixed_experience(sft_dir, loss_type):
    """The same rollout batch on every process (seeded), with the policy it came from."""
    from rlhf_kernels.tasks import get_task
    from rlhf_kernels.trainer.grpo import make_group_experience
    from rlhf_kernels.trainer.models import load_policy
    policy, tok = load_policy(sft_dir)
    cfg = GRPOConfig(device="cpu", task="letters-easy", prompts_per_step=4, num_generations=2, ppo_epochs=2,
                     loss_type=loss_type, beta=0.1, max_new_tokens=10, max_len=32)
    torch.manual_seed(0)
    ref = __import__("copy").deepcopy(policy).eval()
    task = get_task("letters-easy")
    exp, _ = make_group_experience(cfg, policy, ref, None, tok, task.prompts(4, 3), torch.device("cpu"), task)
    return cfg, policy, exp


def _shard(exp, rank, world):
    """An uneven split (rank 0: the 6 longest responses, rank 1: the 2 shortest), each trimmed to its own
    width: ranks hold different numbers of sequences, tokens and padded lengths, as in a real run."""
    assert world == 2
    order = exp["mask"].sum(1).argsort(descending=True, stable=True)
    idx = order[:6] if rank == 0 else order[6:]
    e = {k: v[idx] for k, v in exp.items()}
    T = int(e["attention_mask"].any(0).nonzero().max()) + 1
    return {k: v[:, :T] if k in ("input_ids", "attention_mask") else v[:, :T - 1] for k, v in e.items()}


def _update(cfg, policy, exp):
    from rlhf_kernels.trainer.grpo import grpo_update
    torch.manual_seed(1)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)   # SGD: parameters move by the gradient itself
    stats = grpo_update(cfg, policy, opt, exp)
    return stats


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def test_grpo_ddp_update_matches_one_process(tmp_path, sft_run):
    """2 ranks (torchrun, gloo) each updating on half the rollout batch, DDP + global normalisation,
    end with the same parameters and loss as one process on the whole batch."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.abspath(__file__), sft_run["dir"], str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for lt in LOSS_TYPES:
        cfg, policy, exp = _fixed_experience(sft_run["dir"], lt)
        stats = _update(cfg, policy, exp)
        got = torch.load(tmp_path / f"{lt}.pt", weights_only=True)
        assert got["pg_loss"] == pytest.approx(stats["pg_loss"], rel=1e-4, abs=1e-6), lt
        for name, p in policy.state_dict().items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{lt} {name}: {m}")


if __name__ == "__main__":   # one rank of test_grpo_ddp_update_matches_one_process
    import os
    import sys

    import torch.distributed as dist
    sft_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for lt in LOSS_TYPES:
        cfg, policy, exp = _fixed_experience(sft_dir, lt)
        ddp = torch.nn.parallel.DistributedDataParallel(policy)
        stats = _update(cfg, ddp, _shard(exp, rank, world))
        if rank == 0:
            torch.save({"pg_loss": stats["pg_loss"], "params": policy.state_dict()}, f"{out}/{lt}.pt")
        del ddp  # its reducer holds gloo work; release it while both ranks are still here
        dist.barrier()
    # Leaving together: a rank that tears gloo down while its peer still talks, or whose leftover
    # objects touch it during interpreter shutdown, can abort ("terminate called"): collect, wait,
    # destroy, then exit without the interpreter's teardown.
    from rlhf_kernels.trainer.distributed import dist_teardown
    dist_teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
