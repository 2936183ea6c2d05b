"""DPO: sequence log-probs, loss variants, config errors, a smoke run that learns the preferences, exact resume."""
import json
import statistics

import pytest
import torch

from rlhf_kernels.trainer.config import make_config
from rlhf_kernels.trainer.dpo import DPOConfig, pair_logps, train_dpo


def _mean(h, k, sl):
    return statistics.mean(r[k] for r in h[sl])


def test_pair_logps_sum_response_tokens(sft_run):
    """Sequence log-prob = Σ over response tokens (EOS included) of log softmax, prompt excluded."""
    from rlhf_kernels.trainer.data import collate_pairs
    model, tok = sft_run["model"].eval(), sft_run["tok"]
    rows = [{"prompt": "ab:", "chosen": "abab", "rejected": "c"}]
    b = collate_pairs(rows, tok)
    with torch.no_grad():
        pc, pr = pair_logps(model, b)
        for got, resp in ((pc, "abab"), (pr, "c")):
            ids = torch.tensor([tok.encode("ab:" + resp) + [tok.eos_id]])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            n_prompt = len(tok.encode("ab:"))
            want = sum(lp[t, ids[0, t + 1]] for t in range(n_prompt - 1, ids.shape[1] - 1))
            torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


def test_dpo_learns_the_preferences(tmp_path, tiny, sft_run):
    cfg = DPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], task="letters-easy", steps=40, batch_size=32,
                    lr=1e-3, n_train=2000, max_new_tokens=12, eval_prompts=64)
    _, _, hist, summary = train_dpo(cfg)
    before, after = summary["sft_eval"], summary["dpo_eval"]
    print(f"held-out acc {before['pairs']['acc']:.3f} -> {after['pairs']['acc']:.3f}, margin "
          f"{after['pairs']['margin']:.3f}; gold {before['gold']:.3f} -> {after['gold']:.3f}, KL {after['kl']:.2f}")
    assert len(hist) == 40
    for k in ("loss", "margin", "acc", "reward_chosen", "reward_rejected", "tokens_per_s", "peak_mem_mb"):
        assert all(torch.isfinite(torch.tensor(r[k])) for r in hist), k
    assert hist[0]["loss"] == pytest.approx(0.6931, abs=1e-3)   # policy == reference at step 0
    assert _mean(hist, "loss", slice(-10, None)) < hist[0]["loss"]
    assert before["pairs"]["acc"] == 0.5 and before["pairs"]["margin"] == 0   # ties at init
    assert after["pairs"]["acc"] > 0.7 and after["pairs"]["margin"] > 0.05     # 200 held-out pairs
    assert after["kl"] > 0 and summary["final_kl"] == after["kl"]


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_variants_run_and_match_rk(tmp_path, tiny, sft_run, loss_type, smoothing):
    import rlhf_kernels as rk
    cfg = DPOConfig(**tiny, out_dir=str(tmp_path), sft=sft_run["dir"], task="letters-easy", steps=3, batch_size=8,
                    n_train=100, loss_type=loss_type, label_smoothing=smoothing, beta=0.5, eval_prompts=0)
    _, _, hist, summary = train_dpo(cfg)
    z = torch.zeros(1)
    assert hist[0]["loss"] == pytest.approx(rk.dpo_loss(z, z, z, z, beta=0.5, loss_type=loss_type,
                                                        label_smoothing=smoothing).item(), rel=1e-5)
    assert "gold" not in summary["dpo_eval"] and "pairs" in summary["dpo_eval"]


@pytest.mark.parametrize("values, match", [
    ({"loss_type": "kto"}, r"loss_type must be one of"),
    ({"beta": 0}, r"beta must be > 0"),
    ({"label_smoothing": 0.6}, r"label_smoothing must be in"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, r"sigmoid' only"),
    ({"eval_frac": 1.0}, r"eval_frac"),
])
def test_bad_dpo_config_is_a_clear_error(values, match):
    with pytest.raises(ValueError, match=match):
        make_config(DPOConfig, None, values)


def test_dpo_cli_with_jsonl_pairs(tmp_path, capsys, sft_run):
    from rlhf_kernels.trainer.cli import main
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": "ab:", "chosen": "abab", "rejected": "hh"}) + "\n" for _ in range(8)))
    rc = main(["dpo", "--sft", sft_run["dir"], "--data", str(f), "--steps", "2", "--batch_size", "4",
               "--out_dir", str(tmp_path / "out"), "--no_progress", "--threads", "1", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert "held-out preference accuracy" in capsys.readouterr().out
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ab:", "response": "x"}) + "\n")
    assert main(["dpo", "--sft", sft_run["dir"], "--data", str(bad), "--out_dir", str(tmp_path / "o2")]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main(["dpo", "--out_dir", str(tmp_path / "o3")]) == 2
    assert "--sft" in capsys.readouterr().err


def test_dpo_resume_is_exact(tmp_path, tiny, sft_run):
    kw = dict(tiny, sft=sft_run["dir"], task="letters-easy", steps=6, batch_size=8, n_train=200, lr=1e-3,
              eval_prompts=16, max_new_tokens=8)
    keys = ["loss", "margin", "acc", "reward_chosen", "grad_norm", "lr"]
    _, _, full, s_full = train_dpo(DPOConfig(**kw, out_dir=str(tmp_path / "a")))
    _, _, part, _ = train_dpo(DPOConfig(**kw, out_dir=str(tmp_path / "b"), stop_after=3))
    assert len(part) == 3
    _, _, resumed, s_res = train_dpo(DPOConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
    assert s_res["dpo_eval"] == s_full["dpo_eval"]


def _torchrun(args, tmp_path, nproc=2):
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "rlhf_kernels.trainer.cli", *args]
    r = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _final_history(out_dir):
    import os
    from rlhf_kernels.trainer.checkpoint import latest_checkpoint
    st = torch.load(os.path.join(latest_checkpoint(out_dir), "trainer_state.pt"), weights_only=True)
    return json.loads(st["extra_json"])["history"]


def test_dpo_ddp_two_ranks_match_one_process(tmp_path, tiny, sft_run):
    """torchrun, 2 ranks, gloo on CPU: same losses and parameters as one process on the same global batch."""
    from safetensors.torch import load_file
    kw = dict(task="letters-easy", steps=4, batch_size=8, n_train=120, lr=1e-3, eval_prompts=0)
    _, _, one, _ = train_dpo(DPOConfig(**tiny, **kw, sft=sft_run["dir"], out_dir=str(tmp_path / "one")))
    flags = [f"--{k}={v}" for k, v in {**tiny, **kw}.items() if k not in ("progress", "log_every")]
    _torchrun(["dpo", "--sft", sft_run["dir"], "--out_dir", str(tmp_path / "two"), "--no_progress",
               "--log_every", "0", *flags], tmp_path)
    two = _final_history(str(tmp_path / "two"))
    for k in ("loss", "margin", "acc"):
        torch.testing.assert_close(torch.tensor([r[k] for r in two]), torch.tensor([r[k] for r in one]),
                                   rtol=1e-4, atol=1e-5, msg=k)
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    E = tiny["n_embd"]
    for name in a:
        x, y = b[name], a[name]
        if name.endswith("attn.c_attn.bias"):
            # the key bias has zero true gradient (softmax is shift-invariant), so Adam divides rounding noise
            # by its own size and moves it by up to ~lr per step in either run: compare it loosely, the rest tightly
            torch.testing.assert_close(x[E:2 * E], y[E:2 * E], rtol=0, atol=4 * kw["lr"])
            x, y = torch.cat([x[:E], x[2 * E:]]), torch.cat([y[:E], y[2 * E:]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_demo_compare_table_and_plot(tmp_path, capsys):
    """``demo --algo grpo,dpo`` (GRPO on the gold reward: no reward model needed) writes one table and one plot."""
    from rlhf_kernels.trainer.cli import main
    from rlhf_kernels.trainer.config import make_config
    from rlhf_kernels.trainer.demo import DemoConfig
    rc = main(["demo", "--algo", "grpo,dpo", "--grpo_reward", "gold", "--runs_dir", str(tmp_path), "--name", "c",
               "--task", "letters-easy", "--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--n_positions", "32",
               "--max_len", "32", "--sft_steps", "30", "--sft_lr", "3e-3", "--sft_examples", "500", "--grpo_steps", "3",
               "--dpo_steps", "3", "--rm_pairs", "100", "--eval_prompts", "16", "--max_new_tokens", "8",
               "--no_progress", "--log_every", "0", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| GRPO |" in out and "| DPO |" in out and "| PPO |" not in out
    report = (tmp_path / "c" / "report.md").read_text()
    assert "KL(π‖π_SFT)" in report and "compare.png" in report
    assert (tmp_path / "c" / "compare.png").is_file() and not (tmp_path / "c" / "rm").exists()
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())["summary"]
    assert set(summary["algos"]) == {"grpo", "dpo"} and summary["rm_heldout_acc"] is None
    with pytest.raises(ValueError, match="algo must be"):
        make_config(DemoConfig, None, {"algo": "ppo,sac"})
