"""Trainer step time, tokens/s and peak memory per stage: fused ops, fused LM head, eager (reference) ops.

    python -m benchmarks.bench_trainer                      # CPU-sized defaults (GPU sizes on a GPU)
    python -m benchmarks.bench_trainer --vocab 50257 --n_embd 256 --batch 16 --seq 256 --out benchmarks/results

Stages (one optimizer step each, a GPT-2 built from a config, random tokens, response = second half; on a GPU
the default config is GPT-2 small, 124M parameters: V=50257 H=768 L=12, B=32 x T=512 tokens):
  sft          response NLL through rk.logprobs, backward, AdamW
  rm           Bradley-Terry through rk.reward_model_loss on chosen/rejected, backward, AdamW
  ppo-exp      rollout (generate) + old/ref log-probs + values + RM score + rk.gae
  ppo-update   one PPO epoch x 2 minibatches of rk.ppo_loss + rk.value_loss
Variants ("ops"):
  fused       the default backend for the device (C++ CPU / Triton / CUDA) on the model's [B, T, V] logits
  fused-head  --fused-head: the same ops from the final hidden states and the LM head weight
              (rk.linear_cross_entropy / linear_logprobs / linear_ppo_loss), the logits never exist;
              sft, ppo-exp and ppo-update only (the reward model has no vocabulary head)
  eager       backend="torch", the plain-PyTorch reference that materialises the [N, V] fp32 temporaries
tokens/s counts the B x T tokens of the step's batch (ppo-exp: prompt + response, ppo-update: one epoch).
Each step runs as the trainer's CLI runs it: target checks queued and checked once at the step's end
(``rk.async_target_checks``), every variant alike.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch

import rlhf_kernels as rk
from benchmarks import common
from rlhf_kernels.trainer.fused_head import FusedHeadLM
from rlhf_kernels.trainer.models import ScalarHeadModel
from rlhf_kernels.trainer.ppo import PPOConfig, make_experience, ppo_update
from rlhf_kernels.trainer.reward import rm_forward
from rlhf_kernels.trainer.sft import sft_loss


class _Tok:
    """Maps characters to ids of a large synthetic vocabulary (EOS = V-2, PAD = V-1)."""

    def __init__(self, vocab):
        self.vocab_size, self.eos_id, self.pad_id = vocab, vocab - 2, vocab - 1

    def encode(self, s):
        return [(ord(c) * 7919) % (self.vocab_size - 2) for c in s]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def build(args, dev):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok = _Tok(args.vocab)
    conf = GPT2Config(vocab_size=args.vocab, n_positions=2 * args.seq, n_embd=args.n_embd, n_layer=args.n_layer,
                      n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    lm = GPT2LMHeadModel(conf).to(dev)
    B, T = args.batch, args.seq
    ids = torch.randint(0, args.vocab - 2, (B, T), device=dev)
    attn = torch.ones_like(ids)
    lmask = torch.zeros_like(ids)
    lmask[:, T // 2:] = 1
    return lm, tok, {"input_ids": ids, "attention_mask": attn, "loss_mask": lmask}


VARIANTS = (("fused", None, False), ("fused-head", None, True), ("eager", "torch", False))  # (ops, backend, fused_head)
STAGES = ("sft", "rm", "ppo-exp", "ppo-update")


def stages(args, dev, backend, fused_head=False):
    lm, tok, batch = build(args, dev)
    head = FusedHeadLM if fused_head else (lambda m: m)   # what the trainer's --fused-head wraps the policy in
    out = {}
    # --- sft
    model = copy.deepcopy(lm).train()
    actor = head(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def sft_step():
        loss, _ = sft_loss(actor, batch, backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["sft"] = sft_step
    # --- rm
    rm = ScalarHeadModel.from_causal_lm(lm).to(dev)
    ropt = torch.optim.AdamW(rm.parameters(), lr=1e-4)

    def rm_step():
        rc, rr = rm_forward(rm, batch)
        loss = rk.reward_model_loss(rc, rr)
        ropt.zero_grad(set_to_none=True)
        loss.backward()
        ropt.step()
    if not fused_head:
        out["rm"] = rm_step
    # --- ppo
    cfg = PPOConfig(backend=backend, rollout_batch=args.batch, ppo_epochs=1, minibatches=2,
                    max_new_tokens=args.seq // 2, max_len=args.seq, n_positions=2 * args.seq)  # as the model above
    policy, ref, critic = copy.deepcopy(lm), copy.deepcopy(lm).eval(), copy.deepcopy(rm)
    popt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    copt = torch.optim.AdamW(critic.parameters(), lr=1e-6)
    prompts = [{"prompt": "".join(chr(97 + (i * 7 + j) % 26) for j in range(args.seq // 2))} for i in range(args.batch)]
    state = {}

    actor, ref = head(policy), head(ref)

    def exp_step():
        state["exp"], _ = make_experience(cfg, actor, ref, critic, rm, tok, prompts, 0.05, dev)

    def upd_step():
        ppo_update(cfg, actor, critic, popt, copt, state["exp"], 0.05)
    out["ppo-exp"] = exp_step
    out["ppo-update"] = upd_step
    return out


def main(argv=None):
    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257 if on_gpu else 8192)
    p.add_argument("--n_embd", type=int, default=768 if on_gpu else 128)
    p.add_argument("--n_layer", type=int, default=12 if on_gpu else 2)  # GPU: GPT-2 small, 124M parameters
    p.add_argument("--n_head", type=int, default=12 if on_gpu else 4)
    p.add_argument("--batch", type=int, default=32 if on_gpu else 8)
    p.add_argument("--seq", type=int, default=512 if on_gpu else 128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if on_gpu else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS),
                   help="comma list of: " + ", ".join(v[0] for v in VARIANTS))
    p.add_argument("--out", default=None, help="write <out>/<device-slug>/trainer.{csv,md}")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment(dev)
    rows = []
    variants = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    fns = {name: stages(args, dev, backend, fused_head) for name, backend, fused_head in variants}
    tokens = args.batch * args.seq
    def as_trainer(step):
        """``step`` as the trainer's CLI runs it: target checks queued, checked once at its end."""
        def run():
            with rk.async_target_checks():
                step()
        return run

    for stage in STAGES:
        ts = {name: [] for name in fns if stage in fns[name]}
        for name in ts:
            for _ in range(args.warmup):
                as_trainer(fns[name][stage])()
        for _ in range(args.reps):  # interleaved, so a busy machine hurts every variant alike
            for name, times in ts.items():
                _sync(dev)
                t = time.perf_counter()
                as_trainer(fns[name][stage])()
                _sync(dev)
                times.append((time.perf_counter() - t) * 1e3)
        for name, times in ts.items():
            ms = statistics.median(times)
            peak = common.peak_extra_bytes(as_trainer(fns[name][stage]), dev) / 2**20
            rows.append({"stage": stage, "ops": name, "ms": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3),
                         "peak_extra_mib": round(peak, 1)})
            print(f"{stage:<11} {name:<10} {ms:9.2f} ms {tokens / ms * 1e3:10.0f} tok/s  peak +{peak:8.1f} MiB",
                  flush=True)
    by = {(r["stage"], r["ops"]): r for r in rows}
    shape = f"V={args.vocab} H={args.n_embd} L={args.n_layer} B={args.batch} T={args.seq}"
    md = [f"# Trainer step: fused ops, fused LM head, eager ops ({shape})", "", common.stamp_line(env), "",
          ("Peak: memory allocated during one step beyond what was live before it (CUDA), or the process's "
           "peak RSS growth during it (CPU; benchmarks/common.py). Ratios against eager from the same run; on the "
           "CPU the variants' steps are interleaved, so a busy machine slows each alike."), "",
          "| stage | ops | ms | tokens/s | peak MiB | speed-up vs eager | peak vs eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        e = by.get((r["stage"], "eager"))
        vs = (f"{e['ms'] / r['ms']:.2f}x | {r['peak_extra_mib'] / e['peak_extra_mib']:.2f}x"
              if e and e["peak_extra_mib"] > 0 else "- | -")
        md.append(f"| {r['stage']} | {r['ops']} | {r['ms']:.1f} | {r['tokens_per_s']} | {r['peak_extra_mib']:.1f} | {vs} |")
    text = "\n".join(md) + "\n"
    print("\n" + text)
    if args.out:
        d = os.path.join(args.out, env["device_slug"])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "trainer.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["stage", "ops", "ms", "tokens_per_s", "peak_extra_mib", "shape", *env])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "shape": shape, **env})
        with open(os.path.join(d, "trainer.md"), "w") as fh:
            fh.write(text)
        print(f"wrote {d}/trainer.csv, trainer.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
