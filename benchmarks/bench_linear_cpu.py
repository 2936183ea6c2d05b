"""CPU measurement of the fused-linear ops against the materialised path (issue 6).

Shape: fp32 (``--dtype bf16`` for 16-bit hidden / weight), N = 2048 tokens, H = 512, V = 50257 (GPT-2), on
whatever CPU runs it.
Ops (``--ops``, default all) and providers, each forward + backward to hidden and weight:

  logprobs       loss ``-mean(logp)`` on top of the op (the upstream gradient reaches it in backward)
    fused          rk.linear_logprobs: chunked matmul + the C++ log-prob kernel, logits recomputed in backward
                   (chunk_by="auto": row chunks on the CPU)
    fused-rows     the same, chunk_by="rows" named
    fused-vocab    the same over vocabulary slabs, chunk_by="vocab" (a slab's GEMMs keep its weight rows in cache)
    materialised   F.linear -> (float32) log_softmax -> gather, then autograd (the [N, V] logits, log-softmax and grads)
  logprobs_frozen  the same with a head that needs no gradient (LoRA): the gradient to hidden only
    fused          rk.linear_logprobs: the gradient direction computed in the forward (2 matmuls)
    fused-recompute  return_entropy=True, which takes the recompute path (logits again in backward, 3 matmuls)
    materialised   as above, with the head detached
  cross_entropy  SFT loss, mean over tokens
    fused          rk.linear_cross_entropy: gradient computed in the forward (3 matmuls)
    fused-vocab    the same over vocabulary slabs, chunk_by="vocab" (no [V, H] float32 accumulator, 4 matmuls)
    fused-recompute  the same with grad_in_forward=False (linear_logprobs's path, 4 matmuls)
    materialised   F.linear -> F.cross_entropy, then autograd
  ppo            PPO loss, loss_agg="seq-mean-token-mean" (B=2, T=1024), k3 KL (kl_coef 0.05), no entropy bonus
    fused          rk.linear_ppo_loss: gradient computed in the forward
    fused-vocab    the same over vocabulary slabs (chunk_by="vocab")
    fused-recompute  the same with grad_in_forward=False
    materialised   F.linear -> log_softmax -> gather -> reference.ppo_token_terms -> aggregate_loss, then autograd

plus, for logprobs, the no-grad forward (old-policy / reference scoring) of each.
Reported: median wall time over rounds, peak extra resident memory of one call
(Linux VmHWM after resetting it, minus VmRSS before; ``peak_extra_rss_mib``),
and ratios to the materialised path. Targets (issue 6): memory <= 20 %, time <= 1.2x.

    python -m benchmarks.bench_linear_cpu [--ops logprobs,cross_entropy,ppo] [--threads 1] [--rounds 5] [--out results.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a plain script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rlhf_kernels as rk  # noqa: E402
from benchmarks.bench_cpu_logprobs import peak_extra_rss_mib  # noqa: E402
from rlhf_kernels import reference  # noqa: E402
from rlhf_kernels.ops.linear import auto_chunk_size  # noqa: E402

PPO_T = 1024  # tokens per sequence for the PPO loss (N = B·T)
PPO_OPTIONS = dict(kl_coef=0.05, kl_estimator="k3", clip_low=0.2, clip_high=0.28, loss_agg="seq-mean-token-mean")


def _materialised_logp(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()  # a 16-bit log-softmax would round log-probs to ~3 digits
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _mean_nll_step(logp_of, frozen=False):
    """Forward + backward of ``-mean(logp)``, ``logp = logp_of(hidden, weight, targets, chunk_size)``, to ``hidden``
    and ``weight``, or (``frozen``: the head detached, as under LoRA) to ``hidden`` only."""
    def step(i, chunk_size=None):
        weight = i["weight"].detach() if frozen else i["weight"]
        logp = logp_of(i["hidden"], weight, i["targets"], chunk_size)
        return torch.autograd.grad(-logp.mean(), (i["hidden"],) if frozen else (i["hidden"], i["weight"]))
    return step


def _fused_logp(chunk_by=None, return_entropy=False):
    """``rk.linear_logprobs`` on the CPU kernels (only its log-prob when ``return_entropy``)."""
    def logp_of(hidden, weight, targets, chunk_size):
        out = rk.linear_logprobs(hidden, weight, targets, chunk_size=chunk_size, backend="cpu", chunk_by=chunk_by,
                                 return_entropy=return_entropy)
        return out[0] if return_entropy else out
    return logp_of


def _materialised_logp_of(hidden, weight, targets, chunk_size):
    return _materialised_logp(hidden, weight, targets)


def _logprobs_forward(chunk_by=None):
    def forward(i, chunk_size=None):
        with torch.no_grad():
            return rk.linear_logprobs(i["hidden"], i["weight"], i["targets"], chunk_size=chunk_size, backend="cpu",
                                      chunk_by=chunk_by)
    return forward


def materialised_forward(i, chunk_size=None):
    with torch.no_grad():
        return _materialised_logp(i["hidden"], i["weight"], i["targets"])


def _ce_fused(grad_in_forward, chunk_by=None):
    def step(i, chunk_size=None):
        loss = rk.linear_cross_entropy(i["hidden"], i["weight"], i["targets"], chunk_size=chunk_size, backend="cpu",
                                       grad_in_forward=grad_in_forward, chunk_by=chunk_by)
        return torch.autograd.grad(loss, (i["hidden"], i["weight"]))

    return step


def ce_materialised(i, chunk_size=None):
    loss = F.cross_entropy(F.linear(i["hidden"], i["weight"]).float(), i["targets"])
    return torch.autograd.grad(loss, (i["hidden"], i["weight"]))


def _ppo_args(i):
    shape = (-1, PPO_T)
    return (i["targets"].reshape(shape), i["old_logp"].reshape(shape), i["advantages"].reshape(shape),
            i["mask"].reshape(shape))  # fmt: skip


def _ppo_fused(grad_in_forward, chunk_by=None):
    def step(i, chunk_size=None):
        hidden = i["hidden"].reshape(-1, PPO_T, i["hidden"].shape[-1])
        out = rk.linear_ppo_loss(hidden, i["weight"], *_ppo_args(i), ref_logp=i["ref_logp"].reshape(-1, PPO_T),
                                 chunk_size=chunk_size, backend="cpu", grad_in_forward=grad_in_forward,
                                 chunk_by=chunk_by, **PPO_OPTIONS)
        return torch.autograd.grad(out.loss, (i["hidden"], i["weight"]))

    return step


def ppo_materialised(i, chunk_size=None):
    targets, old_logp, adv, mask = _ppo_args(i)
    logp = _materialised_logp(i["hidden"], i["weight"], i["targets"]).reshape(targets.shape)
    opts = {k: v for k, v in PPO_OPTIONS.items() if k != "loss_agg"}
    term, _, _ = reference.ppo_token_terms(logp, torch.zeros_like(logp), old_logp, adv,
                                           ref_logp=i["ref_logp"].reshape(targets.shape), entropy_coef=0.0,
                                           dual_clip=None, **opts)  # fmt: skip
    loss = reference.aggregate_loss(term, mask, PPO_OPTIONS["loss_agg"])
    return torch.autograd.grad(loss, (i["hidden"], i["weight"]))


OPS = {
    "logprobs": [
        ("fwd+bwd", "fused", _mean_nll_step(_fused_logp())),
        ("fwd+bwd", "fused-rows", _mean_nll_step(_fused_logp("rows"))),
        ("fwd+bwd", "fused-vocab", _mean_nll_step(_fused_logp("vocab"))),
        ("fwd+bwd", "materialised", _mean_nll_step(_materialised_logp_of)),
        ("fwd (no grad)", "fused", _logprobs_forward()),
        ("fwd (no grad)", "fused-rows", _logprobs_forward("rows")),
        ("fwd (no grad)", "fused-vocab", _logprobs_forward("vocab")),
        ("fwd (no grad)", "materialised", materialised_forward),
    ],
    "logprobs_frozen": [
        ("fwd+bwd", "fused", _mean_nll_step(_fused_logp(), frozen=True)),
        ("fwd+bwd", "fused-recompute", _mean_nll_step(_fused_logp(return_entropy=True), frozen=True)),
        ("fwd+bwd", "materialised", _mean_nll_step(_materialised_logp_of, frozen=True)),
    ],
    "cross_entropy": [
        ("fwd+bwd", "fused", _ce_fused(None)),
        ("fwd+bwd", "fused-vocab", _ce_fused(None, "vocab")),
        ("fwd+bwd", "fused-recompute", _ce_fused(False)),
        ("fwd+bwd", "materialised", ce_materialised),
    ],
    "ppo": [
        ("fwd+bwd", "fused", _ppo_fused(None)),
        ("fwd+bwd", "fused-vocab", _ppo_fused(None, "vocab")),
        ("fwd+bwd", "fused-recompute", _ppo_fused(False)),
        ("fwd+bwd", "materialised", ppo_materialised),
    ],
}
TITLES = {"logprobs": "linear_logprobs", "logprobs_frozen": "linear_logprobs, frozen head (gradient to hidden only)", "cross_entropy": "linear_cross_entropy", "ppo": "linear_ppo_loss"}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype = torch.float32) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(n, h).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h) * h**-0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():  # old / reference log-probs near the current ones, so the clip is active on some tokens
        logp = rk.linear_logprobs(hidden, weight, targets, backend="cpu")
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": targets,
        "old_logp": logp + 0.3 * torch.randn(n),
        "ref_logp": logp + 0.3 * torch.randn(n),
        "advantages": torch.randn(n),
        "mask": torch.rand(n) > 0.1,
    }


def _memory_in_fresh_process(case: str, argv) -> float | None:
    """Peak extra RSS of one call of ``case``, measured in a new interpreter with the same arguments."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--out" in argv:  # the child only prints its number
        i = argv.index("--out")
        del argv[i : i + 2]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.bench_linear_cpu", *argv, "--memory-case", case]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    value = out.strip().splitlines()[-1].split()[-1]
    return None if value == "None" else float(value)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _time(fn, rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=50257)
    parser.add_argument("--ops", default=",".join(OPS), help="comma list of " + ", ".join(OPS))
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="hidden and weight dtype (bf16: the fused path's weight gradient is accumulated in "
                             "float32, then cast; fused-vocab has no such accumulator)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk rows (default: automatic)")
    parser.add_argument("--out", default=None, help="also append the markdown table to this file")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if "ppo" in args.ops and args.n % PPO_T:
        parser.error(f"the ppo op needs --n a multiple of {PPO_T} (sequences of {PPO_T} tokens)")
    dtype = DTYPES[args.dtype]
    inputs = make_inputs(args.n, args.h, args.v, dtype)
    cases = {key: f for op in OPS for key, f in ((f"{op}/{kind}/{name}", fn) for kind, name, fn in OPS[op])}
    if args.memory_case is not None:
        fn = cases[args.memory_case]
        small = make_inputs(2 * PPO_T if args.memory_case.startswith("ppo/") else 2, args.h, 64, dtype)
        fn(small)  # one-time costs (library loading, op registration, BLAS buffers) are not the op's memory
        del small
        print(f"PEAK_EXTRA_MIB {peak_extra_rss_mib(lambda: fn(inputs, args.chunk_size))}")
        return ""

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown --ops {unknown}; choose from {sorted(OPS)}")
    chunk = args.chunk_size or auto_chunk_size(args.n, args.h, args.v, dtype, torch.device("cpu"))
    # bf16: the materialised path rounds its logits and dlogits to bf16, so compare at the gradient's scale
    scale = (lambda b: 1e-6) if dtype == torch.float32 else (lambda b: 2e-2 * b.abs().max().item())
    tables = []
    for op in ops:
        # Correctness first: every fwd+bwd provider agrees with the materialised one.
        steps = {name: fn for kind, name, fn in OPS[op] if kind == "fwd+bwd"}
        expected = steps["materialised"](inputs)
        for name, fn in steps.items():
            if name != "materialised":
                for a, b in zip(fn(inputs, args.chunk_size), expected):
                    torch.testing.assert_close(a, b, rtol=1e-3 if dtype == torch.float32 else 5e-2, atol=scale(b))
        del expected

        # Each peak in a fresh process: freed blocks the allocator keeps from earlier calls would hide real peaks.
        memory = {(kind, name): _memory_in_fresh_process(f"{op}/{kind}/{name}", argv) for kind, name, _ in OPS[op]}
        times = {
            (kind, name): _time(lambda fn=fn: fn(inputs, args.chunk_size), args.rounds) for kind, name, fn in OPS[op]
        }
        lines = [
            f"### {TITLES[op]} on CPU: {args.dtype}, N={args.n}, H={args.h}, V={args.v}, chunk={chunk} rows",
            "",
            f"{_cpu_name()}; torch {torch.__version__}; threads {args.threads}; commit {_commit()}; "
            f"median of {args.rounds} rounds after 1 warm-up; each peak RSS in a fresh process",
            "",
            "| pass | provider | ms | time vs materialised | peak extra RSS MiB | memory vs materialised |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for kind, name, _ in OPS[op]:
            ms, mib = times[(kind, name)], memory[(kind, name)]
            base_ms, base_mib = times[(kind, "materialised")], memory[(kind, "materialised")]
            mem_ratio = f"{mib / base_mib:.2f}x" if mib is not None and base_mib else "n/a"
            mib_text = f"{mib:.1f}" if mib is not None else "n/a"
            lines.append(f"| {kind} | {name} | {ms:.1f} | {ms / base_ms:.2f}x | {mib_text} | {mem_ratio} |")
        tables.append("\n".join(lines))
        print(tables[-1] + "\n", flush=True)
    table = "\n\n".join(tables)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n\n")
    return table


if __name__ == "__main__":
    main()
