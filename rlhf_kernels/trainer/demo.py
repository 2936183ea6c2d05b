"""``rlhf-kernels demo``: SFT → reward model → PPO on the embedded gold-reward task, then a
report (``runs/<name>/report.md``, PNG plots, ``summary.json``) and a printed summary.

``--algo grpo|dpo|all`` (or a comma list, e.g. ``ppo,dpo``) runs those algorithms from the same
SFT policy (the RM only where PPO or GRPO with ``grpo_reward rm`` needs it) and the report
compares them: held-out gold reward and KL(π ‖ π_SFT) in one table and one plot.

The numbers that matter: the gold reward of the SFT policy and of the PPO policy on
held-out prompts (sampled at the training temperature), the reward model's held-out
pairwise accuracy, and the final KL to the SFT policy.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch

from .config import BaseConfig
from .ppo import PPOConfig, train_ppo
from .reward import RMConfig, train_rm
from .sft import SFTConfig, train_sft


@dataclass
class DemoConfig(BaseConfig):
    name: str = "demo"
    runs_dir: str = "runs"
    task: str = "letters"
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    sft_steps: int = 1500
    sft_lr: float = 1e-3
    sft_examples: int = 20000
    rm_steps: int = 300
    rm_lr: float = 1e-3
    rm_pairs: int = 6000
    ppo_steps: int = 60
    ppo_lr: float = 1e-4
    rollout_batch: int = 64
    kl_coef: float = 0.1
    max_new_tokens: int = 14
    # 5, not 2: at 2 the policy learned, in 4 of 5 PPO seeds on the 2026-11-26 CPU, to drop EOS and lengthen its answers,
    # which the reward model scores up and the gold reward down (gold 0.36-0.65, EOS rate 0-0.39); at 5, 6 of 6 seeds
    # kept EOS and reached gold 0.857-0.890 (KL 14-17 nats) from the same SFT policy and reward model
    missing_eos_penalty: float = 5.0
    eval_prompts: int = 256
    threads: int = 1      # the demo's models are tiny: one thread is as fast and immune to a busy machine
    # issue 8: --algo grpo|dpo|all compares the algorithms (default: PPO only, the report above)
    algo: str = "ppo"     # ppo | grpo | dpo | all | comma list
    grpo_steps: int = 60
    # 1e-4, not GRPO's 3e-4: against a slightly different reward model (an SFT stage changed by rounding) 3e-4 and
    # 2e-4 collapsed in 4 of 4 seeds (no EOS, KL 35-65 nats, gold 0.14-0.42); 1e-4 gave 0.65-0.68 on both RMs
    grpo_lr: float = 1e-4
    grpo_prompts: int = 16        # prompts per step (× grpo_generations responses = the rollout batch)
    grpo_generations: int = 4
    grpo_reward: str = "rm"       # rm (same learned reward as PPO) | gold (the task's program)
    grpo_loss_type: str = "grpo"
    grpo_beta: float = 0.04
    dpo_steps: int = 300          # on the RM's preference pairs (rm_pairs)
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    dpo_loss_type: str = "sigmoid"

    def validate(self):
        for k in ("sft_steps", "rm_steps", "ppo_steps", "rollout_batch", "grpo_steps", "dpo_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        self.algos()
        if self.grpo_reward not in ("rm", "gold"):
            raise ValueError(f"grpo_reward must be 'rm' or 'gold', got {self.grpo_reward!r}")

    def algos(self) -> list[str]:
        names = ["ppo", "grpo", "dpo"] if self.algo == "all" else [a.strip() for a in self.algo.split(",")]
        bad = [a for a in names if a not in ("ppo", "grpo", "dpo")]
        if bad or not names:
            raise ValueError(f"algo must be ppo, grpo, dpo, all or a comma list of them, got {self.algo!r}")
        return list(dict.fromkeys(names))


def run_demo(cfg: DemoConfig) -> dict:
    if cfg.algos() != ["ppo"]:
        return run_compare(cfg)
    root = os.path.join(cfg.runs_dir, cfg.name)
    os.makedirs(root, exist_ok=True)
    common = dict(seed=cfg.seed, device=cfg.device, backend=cfg.backend, model=cfg.model, tokenizer=cfg.tokenizer,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions,
                  max_len=cfg.max_len, log_every=cfg.log_every, progress=cfg.progress, grad_clip=cfg.grad_clip,
                  fused_head=cfg.fused_head,
                  threads=cfg.threads if torch.device(_dev(cfg.device)).type == "cpu" else 0)
    t0 = time.perf_counter()
    sft_cfg = SFTConfig(**common, out_dir=os.path.join(root, "sft"), task=cfg.task, steps=cfg.sft_steps,
                        lr=cfg.sft_lr, n_train=cfg.sft_examples)
    policy, tok, sft_hist = train_sft(sft_cfg)
    t_sft = time.perf_counter() - t0
    rm_cfg = RMConfig(**common, out_dir=os.path.join(root, "rm"), init=os.path.join(root, "sft", "final"),
                      task=cfg.task, steps=cfg.rm_steps, lr=cfg.rm_lr, n_train=cfg.rm_pairs)
    rm, _, rm_hist, rm_acc = train_rm(rm_cfg)
    t_rm = time.perf_counter() - t0 - t_sft
    ppo_cfg = PPOConfig(**common, out_dir=os.path.join(root, "ppo"), task=cfg.task, steps=cfg.ppo_steps,
                        lr=cfg.ppo_lr, rollout_batch=cfg.rollout_batch, kl_coef=cfg.kl_coef,
                        max_new_tokens=cfg.max_new_tokens, missing_eos_penalty=cfg.missing_eos_penalty,
                        eval_prompts=cfg.eval_prompts)
    policy, tok, ppo_hist, summ = train_ppo(ppo_cfg, policy=policy, tok=tok, rm=rm)
    t_ppo = time.perf_counter() - t0 - t_sft - t_rm
    summary = {
        "sft_gold": summ["sft_eval"]["gold"], "ppo_gold": summ["ppo_eval"]["gold"],
        "gold_gain": summ["ppo_eval"]["gold"] - summ["sft_eval"]["gold"],
        "rm_heldout_acc": rm_acc, "final_kl": summ["final_kl"], "eval_prompts": summ["ppo_eval"]["n"],
        "sft_eval": summ["sft_eval"], "ppo_eval": summ["ppo_eval"],
        "time_s": {"sft": t_sft, "rm": t_rm, "ppo": t_ppo, "total": time.perf_counter() - t0},
        "device": _device_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"summary": summary, "config": asdict(cfg),
                   "history": {"sft": sft_hist, "rm": rm_hist, "ppo": ppo_hist}}, f, indent=1)
    plots = write_plots(root, sft_hist, rm_hist, ppo_hist, summary)
    write_report(root, cfg, summary, plots)
    print(format_summary(summary, root))
    return summary


def _dev(pref):
    from .models import device_of
    return device_of(pref)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def format_summary(s: dict, root: str) -> str:
    return "\n".join([
        f"== RLHF demo ({s['device']}, {s['time_s']['total']:.0f} s) ==",
        f"gold reward, SFT policy : {s['sft_gold']:.3f}   ({s['eval_prompts']} held-out prompts)",
        f"gold reward, PPO policy : {s['ppo_gold']:.3f}   (+{s['gold_gain']:.3f})",
        f"reward model held-out accuracy: {s['rm_heldout_acc']:.3f}",
        f"final KL(PPO || SFT): {s['final_kl']:.2f} nats/sequence",
        f"report: {os.path.join(root, 'report.md')}",
    ])


def write_plots(root, sft_hist, rm_hist, ppo_hist, summary) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(h, k):
        return [r["step"] for r in h], [r[k] for r in h]

    out = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(*col(ppo_hist, "proxy"), label="proxy (reward model)")
    ax[0].set_xlabel("PPO step"); ax[0].set_ylabel("proxy reward"); ax[0].legend(loc="upper left")
    ax[1].plot(*col(ppo_hist, "gold"), color="C1", label="gold (rollout batch)")
    ax[1].axhline(summary["sft_gold"], color="gray", ls="--", label="SFT policy (held-out)")
    ax[1].axhline(summary["ppo_gold"], color="C2", ls="--", label="PPO policy (held-out)")
    ax[1].set_xlabel("PPO step"); ax[1].set_ylabel("gold reward"); ax[1].legend(loc="lower right")
    fig.tight_layout(); p = os.path.join(root, "reward.png"); fig.savefig(p, dpi=100); plt.close(fig); out.append(p)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(*col(ppo_hist, "kl"), label="KL(π‖π_SFT), nats/seq")
    ax.set_xlabel("PPO step"); ax.set_ylabel("KL"); ax.legend()
    fig.tight_layout(); p = os.path.join(root, "kl.png"); fig.savefig(p, dpi=100); plt.close(fig); out.append(p)

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(*col(sft_hist, "loss")); ax[0].set_title("SFT loss (response NLL)"); ax[0].set_xlabel("step")
    ax[1].plot(*col(rm_hist, "loss"), label="BT loss"); ax[1].plot(*col(rm_hist, "acc"), label="batch acc")
    ax[1].set_title("reward model"); ax[1].set_xlabel("step"); ax[1].legend()
    ax[2].plot(*col(ppo_hist, "pg_loss"), label="policy loss"); ax[2].plot(*col(ppo_hist, "value_loss"), label="value loss")
    ax[2].set_title("PPO losses"); ax[2].set_xlabel("step"); ax[2].legend()
    fig.tight_layout(); p = os.path.join(root, "losses.png"); fig.savefig(p, dpi=100); plt.close(fig); out.append(p)
    return out


def write_report(root, cfg, s, plots) -> None:
    t = s["time_s"]
    lines = [
        f"# RLHF demo: {cfg.name}", "",
        f"Task `{cfg.task}` (rlhf_kernels/tasks): answer a 5-letter prompt with letters drawn from it; the gold reward",
        "is computed by a program, preferences come from a noisy simulated annotator (Bradley-Terry on gold).", "",
        f"Device: {s['device']}; torch {s['torch']}; {s['threads']} threads. Wall time {t['total']:.0f} s "
        f"(SFT {t['sft']:.0f} s, RM {t['rm']:.0f} s, PPO {t['ppo']:.0f} s).", "",
        "| metric | value |", "|---|---|",
        f"| gold reward, SFT policy ({s['eval_prompts']} held-out prompts) | {s['sft_gold']:.3f} |",
        f"| gold reward, PPO policy ({s['eval_prompts']} held-out prompts) | {s['ppo_gold']:.3f} |",
        f"| gain | {s['gold_gain']:+.3f} |",
        f"| reward model held-out pairwise accuracy | {s['rm_heldout_acc']:.3f} |",
        f"| final KL(PPO ‖ SFT), nats/sequence | {s['final_kl']:.2f} |",
        f"| SFT / PPO EOS rate | {s['sft_eval']['eos_rate']:.2f} / {s['ppo_eval']['eos_rate']:.2f} |",
        f"| SFT / PPO mean response length (chars) | {s['sft_eval']['mean_len']:.1f} / {s['ppo_eval']['mean_len']:.1f} |",
        "",
    ]
    lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "## Config", "", "```json", json.dumps(asdict(cfg), indent=1), "```", ""]
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write("\n".join(lines))


# ----------------------------------------------------------------------------- --algo grpo|dpo|all
def run_compare(cfg: DemoConfig) -> dict:
    """SFT (+ RM where needed), then each algorithm from the SFT policy; one table, one plot."""
    from .dpo import DPOConfig, sampled_kl, train_dpo
    from .grpo import GRPOConfig, train_grpo
    from .models import load_policy
    from .rollout import SamplingConfig
    algos = cfg.algos()
    root = os.path.join(cfg.runs_dir, cfg.name)
    os.makedirs(root, exist_ok=True)
    dev = _dev(cfg.device)
    common = dict(seed=cfg.seed, device=cfg.device, backend=cfg.backend, model=cfg.model, tokenizer=cfg.tokenizer,
                  n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions,
                  max_len=cfg.max_len, log_every=cfg.log_every, progress=cfg.progress, grad_clip=cfg.grad_clip,
                  fused_head=cfg.fused_head,
                  threads=cfg.threads if dev.type == "cpu" else 0)
    sft_dir = os.path.join(root, "sft", "final")
    times, hist, res = {}, {}, {}
    t = time.perf_counter()
    _, tok, hist["sft"] = train_sft(SFTConfig(**common, out_dir=os.path.join(root, "sft"), task=cfg.task,
                                              steps=cfg.sft_steps, lr=cfg.sft_lr, n_train=cfg.sft_examples))
    times["sft"] = time.perf_counter() - t
    rm, rm_acc = None, None
    if "ppo" in algos or ("grpo" in algos and cfg.grpo_reward == "rm"):
        t = time.perf_counter()
        rm, _, hist["rm"], rm_acc = train_rm(RMConfig(**common, out_dir=os.path.join(root, "rm"), init=sft_dir,
                                                      task=cfg.task, steps=cfg.rm_steps, lr=cfg.rm_lr,
                                                      n_train=cfg.rm_pairs))
        times["rm"] = time.perf_counter() - t
    sc = SamplingConfig(1.0, 0, 1.0, cfg.max_new_tokens)
    ref, _ = load_policy(sft_dir)
    ref = ref.to(dev).eval()
    eval_rows = None
    for algo in algos:
        t = time.perf_counter()
        out_dir = os.path.join(root, algo)
        if algo == "ppo":
            pol, _, hist[algo], summ = train_ppo(PPOConfig(
                **common, out_dir=out_dir, sft=sft_dir, task=cfg.task, steps=cfg.ppo_steps, lr=cfg.ppo_lr,
                rollout_batch=cfg.rollout_batch, kl_coef=cfg.kl_coef, max_new_tokens=cfg.max_new_tokens,
                missing_eos_penalty=cfg.missing_eos_penalty, eval_prompts=cfg.eval_prompts), rm=rm)
        elif algo == "grpo":
            pol, _, hist[algo], summ = train_grpo(GRPOConfig(
                **common, out_dir=out_dir, sft=sft_dir, task=cfg.task, steps=cfg.grpo_steps, lr=cfg.grpo_lr,
                prompts_per_step=cfg.grpo_prompts, num_generations=cfg.grpo_generations, reward=cfg.grpo_reward,
                loss_type=cfg.grpo_loss_type, beta=cfg.grpo_beta, max_new_tokens=cfg.max_new_tokens,
                missing_eos_penalty=cfg.missing_eos_penalty, eval_prompts=cfg.eval_prompts), rm=rm)
        else:
            pol, _, hist[algo], summ = train_dpo(DPOConfig(
                **common, out_dir=out_dir, sft=sft_dir, task=cfg.task, steps=cfg.dpo_steps, lr=cfg.dpo_lr,
                n_train=cfg.rm_pairs, beta=cfg.dpo_beta, loss_type=cfg.dpo_loss_type,
                max_new_tokens=cfg.max_new_tokens, eval_prompts=cfg.eval_prompts))
        times[algo] = time.perf_counter() - t
        ev = summ[f"{algo}_eval"]
        if eval_rows is None:  # every stage evaluates the same held-out prompts (seed + 10000)
            from ..tasks import get_task
            eval_rows = get_task(cfg.task).prompts(cfg.eval_prompts, cfg.seed + 10_000)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 2)
            kl = sampled_kl(pol, ref, tok, eval_rows, sc, dev, cfg.max_len, cfg.backend)
        res[algo] = {"gold": ev["gold"], "kl": kl, "eos_rate": ev["eos_rate"], "mean_len": ev["mean_len"],
                     "time_s": times[algo]}
        sft_eval = summ["sft_eval"]
    summary = {"algos": res, "sft_gold": sft_eval["gold"], "sft_eval": sft_eval, "rm_heldout_acc": rm_acc,
               "eval_prompts": cfg.eval_prompts, "time_s": {**times, "total": sum(times.values())},
               "device": _device_name(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump({"summary": summary, "config": asdict(cfg), "history": hist}, f, indent=1)
    plot = write_compare_plot(root, hist, summary)
    write_compare_report(root, cfg, summary, plot)
    print(format_compare(summary, root))
    return summary


def _compare_rows(s: dict) -> list[str]:
    rows = [f"| SFT (start) | {s['sft_gold']:.3f} | 0.00 | {s['sft_eval']['eos_rate']:.2f} | "
            f"{s['sft_eval']['mean_len']:.1f} | |"]
    for a, r in s["algos"].items():
        rows.append(f"| {a.upper()} | {r['gold']:.3f} ({r['gold'] - s['sft_gold']:+.3f}) | {r['kl']:.2f} | "
                    f"{r['eos_rate']:.2f} | {r['mean_len']:.1f} | {r['time_s']:.0f} |")
    return rows


def format_compare(s: dict, root: str) -> str:
    head = ["| method | gold reward | KL(π‖π_SFT) nats/seq | EOS rate | mean len | time (s) |", "|---|---|---|---|---|---|"]
    return "\n".join([f"== RLHF comparison ({s['device']}, {s['time_s']['total']:.0f} s) ==", *head, *_compare_rows(s),
                      f"report: {os.path.join(root, 'report.md')}"])


def write_compare_plot(root, hist, s) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].scatter([0.0], [s["sft_gold"]], color="gray", marker="s", label="SFT")
    for i, (a, r) in enumerate(s["algos"].items()):
        ax[0].scatter([r["kl"]], [r["gold"]], color=f"C{i}", s=60, label=a.upper())
        if a in ("ppo", "grpo"):
            h = hist[a]
            ax[1].plot([x["step"] / len(h) for x in h], [x["gold"] for x in h], color=f"C{i}",
                       label=f"{a.upper()} (rollout batch)")
        ax[1].axhline(r["gold"], color=f"C{i}", ls="--", lw=1)
    ax[0].set_xlabel("KL(π‖π_SFT), nats/seq (held-out prompts)"); ax[0].set_ylabel("gold reward (held-out)")
    ax[0].set_title("gold reward vs KL"); ax[0].legend()
    ax[1].axhline(s["sft_gold"], color="gray", ls="--", lw=1, label="SFT (held-out)")
    ax[1].set_xlabel("fraction of training"); ax[1].set_ylabel("gold reward")
    ax[1].set_title("training (dashed: held-out after training)"); ax[1].legend(loc="lower right")
    fig.tight_layout()
    p = os.path.join(root, "compare.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def write_compare_report(root, cfg, s, plot) -> None:
    t = s["time_s"]
    lines = [
        f"# RLHF comparison: {cfg.name} ({', '.join(a.upper() for a in s['algos'])})", "",
        f"Task `{cfg.task}` (rlhf_kernels/tasks): the gold reward is computed by a program; preference pairs come from",
        "a noisy simulated annotator. Every method starts from the same SFT policy. PPO learns from the reward model",
        "trained on the preference pairs, GRPO from "
        + ("the same reward model" if cfg.grpo_reward == "rm" else "the gold reward itself (an upper reference)")
        + ", DPO from the pairs directly.", "",
        f"Device: {s['device']}; torch {s['torch']}; {s['threads']} threads. Wall time {t['total']:.0f} s ("
        + ", ".join(f"{k.upper()} {v:.0f} s" for k, v in t.items() if k != "total") + ").", "",
        f"Gold reward: mean over {s['eval_prompts']} held-out prompts, one sample each at temperature 1. "
        "KL: k1 estimate, nats per sequence, on responses the policy samples for the same prompts.", "",
        "| method | gold reward | KL(π‖π_SFT) nats/seq | EOS rate | mean len | time (s) |", "|---|---|---|---|---|---|",
        *_compare_rows(s), "",
    ]
    if s["rm_heldout_acc"] is not None:
        lines += [f"Reward model held-out pairwise accuracy: {s['rm_heldout_acc']:.3f}.", ""]
    lines += [f"![{os.path.basename(plot)}]({os.path.basename(plot)})", "",
              "## Config", "", "```json", json.dumps(asdict(cfg), indent=1), "```", ""]
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write("\n".join(lines))
