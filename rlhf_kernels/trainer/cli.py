"""Trainer command line: ``rlhf-kernels sft|rm|ppo|demo [--config FILE] [--key value ...]``
(also ``python -m rlhf_kernels.trainer.cli ...``).

Configs are the dataclasses in sft.py / reward.py / ppo.py / demo.py; a YAML or JSON file
gives the base values and ``--key value`` flags override them (``--flag`` alone = true).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import rlhf_kernels as rk

USAGE = """usage: rlhf-kernels {sft,rm,ppo,grpo,dpo,demo} [--config FILE.yaml|json] [--key value ...]

  sft   supervised fine-tuning      (--data prompt/response JSONL, default: embedded task)
  rm    Bradley-Terry reward model  (--data prompt/chosen/rejected JSONL, --init SFT dir)
  ppo   PPO against the RM          (--sft DIR --rm DIR [--data prompt JSONL])
  grpo  GRPO, no critic             (--sft DIR [--reward gold | --reward rm --rm DIR])
  dpo   DPO / IPO / hinge on pairs  (--sft DIR [--data prompt/chosen/rejected JSONL])
  demo  SFT -> RM -> PPO on the embedded gold-reward task, writes runs/<name>/report.md
        (--algo grpo|dpo|all: compare the algorithms in one table and plot)

sft, rm, ppo, grpo and dpo also run under torchrun: data-parallel (DDP, the default) or sharded
(--parallel fsdp: FSDP2, for models that do not fit one GPU), e.g.
  one node, K GPUs (or K CPU processes, gloo):
    torchrun --nproc_per_node K -m rlhf_kernels.trainer.cli grpo --sft DIR ...
  N nodes (run on each node, NODE = 0..N-1):
    torchrun --nnodes N --node_rank NODE --nproc_per_node K --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m rlhf_kernels.trainer.cli ppo --sft DIR --rm DIR --parallel fsdp

--fused-head (sft, ppo, grpo, dpo): the policy's log-probs and losses from its final hidden states and
LM head weight (rk.linear_*), never building the [batch, seq, vocab] logits; off by default. With
RLHF_KERNELS_LINEAR_CHUNK_BY=vocab the losses' gradient is computed over vocabulary slabs, without a
[vocab, hidden] float32 weight-gradient buffer (less memory for a 16-bit LM head, one more matmul); by default
(auto) that happens only when the buffer would not fit in the GPU's free memory (always for a 16-bit head on the
CPU, where it is faster too), =rows never. DPO's sequence
log-probs (rk.linear_logprobs, which recomputes the logits in backward either way) take the slabs by default
on the GPU for a 16-bit head.

`rlhf-kernels <cmd> --help` lists the config keys."""


def _stages():
    from .demo import DemoConfig, run_demo
    from .ppo import PPOConfig, train_ppo
    from .reward import RMConfig, train_rm
    from .sft import SFTConfig, train_sft
    return {"sft": (SFTConfig, train_sft), "rm": (RMConfig, train_rm), "ppo": (PPOConfig, train_ppo),
            "demo": (DemoConfig, run_demo)}


def _help(cls) -> str:
    rows = [f"  --{f.name:<22} {f.default!r}" for f in dataclasses.fields(cls)]
    return f"{cls.__name__} keys (default):\n" + "\n".join(rows)


def run_stage(cmd: str, cls, fn, argv: list[str]):
    """Parse ``argv`` (``--config FILE`` + ``--key value``) into ``cls`` and run ``fn(cfg)``.

    Returns ``(exit_code, cfg, result)``; ``result`` is ``None`` after ``--help`` (code 0), a
    config/data error (printed, code 2), a stage stopped by a signal after its checkpoint (printed with
    the command that resumes it, code 128 + the signal: 130 for Ctrl-C) or by ``stop_after`` (printed, code 0).
    """
    if "-h" in argv or "--help" in argv:
        print(_help(cls))
        return 0, None, None
    from .config import make_config, parse_flags
    from .data import DataError
    from .interrupt import StoppedBySignal
    try:
        file, flags = parse_flags(argv)
        cfg = make_config(cls, file, flags)
        # Target checks queued, not host syncs inside each op: the loops read their loss once per step anyway
        # and call rk.check_pending_targets() there, so a bad target still fails its own step, by name.
        with rk.async_target_checks():
            result = fn(cfg)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"rlhf-kernels {cmd}: error: {e}", file=sys.stderr)
        return 2, None, None
    except StoppedBySignal as e:  # the checkpoint is written: say how to go on, exit as a shell does on Ctrl-C
        if cmd == "demo":
            print(f"rlhf-kernels demo: {e}; the demo has no --resume: run it again", file=sys.stderr)
        else:
            print(f"rlhf-kernels {cmd}: {e}; continue with: rlhf-kernels {' '.join([cmd, *argv])} --resume",
                  file=sys.stderr)
        return 128 + e.signum, None, None
    # every stage returns (model, tokenizer, history, ...); the demo a dict of its own
    if isinstance(result, tuple) and cfg.stop_after and int(os.environ.get("RANK", "0")) == 0:
        history = result[2]
        step = history[-1]["step"] if history else 0
        if step < cfg.steps:  # stop_after ended this invocation early: there is no final/ to report
            print(f"rlhf-kernels {cmd}: stopped after step {step} of {cfg.steps} (stop_after); checkpoint in "
                  f"{cfg.out_dir}/ckpt; continue with --resume")
            return 0, cfg, None
    return 0, cfg, result


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code == 0:  # under torchrun every rank got here: leave the process group together
        from .distributed import dist_teardown
        dist_teardown()
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("grpo", "dpo"):  # issue 8 lives in trainer/grpo.py, trainer/dpo.py
        import importlib
        try:
            mod = importlib.import_module(f"rlhf_kernels.trainer.{cmd}")
        except ImportError:
            print(f"rlhf-kernels {cmd}: not available in this version", file=sys.stderr)
            return 2
        return int(mod.main(rest) or 0)
    stages = _stages()
    if cmd not in stages:
        print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    code, cfg, result = run_stage(cmd, *stages[cmd], rest)
    if result is None:
        return code
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 reports
        return 0
    if cmd == "rm":
        print(f"reward model held-out accuracy: {result[3]:.3f}  -> {cfg.out_dir}/final")
    elif cmd in ("sft", "ppo"):
        print(f"saved -> {cfg.out_dir}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
