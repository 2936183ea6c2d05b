"""CPU measurement of the fused-linear log-prob op against the materialised path (issue 6).

Shape: fp32, N = 2048 tokens, H = 512, V = 50257 (GPT-2), on whatever CPU runs it.
Providers (each forward + backward to hidden and weight of ``-mean(logp)``):
  fused         rk.linear_logprobs (chunked matmul + the C++ log-prob kernel; logits never exist)
  materialised  F.linear -> log_softmax -> gather, then autograd (the [N, V] logits, log-softmax and grads)
Also the no-grad forward (old-policy / reference scoring) of each.
Reported: median wall time over rounds, peak extra resident memory of one call
(Linux VmHWM after resetting it, minus VmRSS before; ``peak_extra_rss_mib``),
and fused / materialised ratios. Targets (issue 6): memory <= 20 %, time <= 1.2x.

    python -m benchmarks.bench_linear_cpu [--threads 1] [--rounds 5] [--out results.md]
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
from rlhf_kernels.ops.linear import auto_chunk_size  # noqa: E402


def fused_step(hidden, weight, targets, chunk_size=None):
    logp = rk.linear_logprobs(hidden, weight, targets, chunk_size=chunk_size, backend="cpu")
    return torch.autograd.grad(-logp.mean(), (hidden, weight))


def materialised_step(hidden, weight, targets, chunk_size=None):
    logits = F.linear(hidden, weight)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.autograd.grad(-logp.mean(), (hidden, weight))


def fused_forward(hidden, weight, targets, chunk_size=None):
    with torch.no_grad():
        return rk.linear_logprobs(hidden, weight, targets, chunk_size=chunk_size, backend="cpu")


def materialised_forward(hidden, weight, targets, chunk_size=None):
    with torch.no_grad():
        logits = F.linear(hidden, weight)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


CASES = [
    ("fwd+bwd", "fused", fused_step),
    ("fwd+bwd", "materialised", materialised_step),
    ("fwd (no grad)", "fused", fused_forward),
    ("fwd (no grad)", "materialised", materialised_forward),
]


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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk rows (default: automatic)")
    parser.add_argument("--out", default=None, help="also append the markdown table to this file")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # internal: one fresh-process measurement
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hidden = torch.randn(args.n, args.h).requires_grad_(True)
    weight = (torch.randn(args.v, args.h) * args.h**-0.5).requires_grad_(True)
    targets = torch.randint(0, args.v, (args.n,))
    inputs = (hidden, weight, targets, args.chunk_size)
    if args.memory_case is not None:
        fn = {f"{kind}/{name}": f for kind, name, f in CASES}[args.memory_case]
        small = (hidden[:2].detach().requires_grad_(True), weight[:, :].detach().requires_grad_(True), targets[:2], None)
        fn(*small)  # one-time costs (library loading, op registration, BLAS buffers) are not the op's memory
        del small
        print(f"PEAK_EXTRA_MIB {peak_extra_rss_mib(lambda: fn(*inputs))}")
        return ""

    # Correctness first: the two paths agree.
    g_fused = fused_step(*inputs)
    g_mat = materialised_step(*inputs)
    for a, b in zip(g_fused, g_mat):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    del g_fused, g_mat

    cases = CASES
    # Each peak in a fresh process: freed blocks the allocator keeps from earlier calls would hide real peaks.
    memory = {(kind, name): _memory_in_fresh_process(f"{kind}/{name}", argv) for kind, name, _ in cases}
    times = {(kind, name): _time(lambda fn=fn: fn(*inputs), args.rounds) for kind, name, fn in cases}

    chunk = args.chunk_size or auto_chunk_size(args.n, args.h, args.v, torch.float32, torch.device("cpu"))
    lines = [
        f"### linear_logprobs on CPU: fp32, N={args.n}, H={args.h}, V={args.v}, chunk={chunk} rows",
        "",
        f"{_cpu_name()}; torch {torch.__version__}; threads {args.threads}; commit {_commit()}; "
        f"median of {args.rounds} rounds after 1 warm-up; each peak RSS in a fresh process",
        "",
        "| pass | provider | ms | time vs materialised | peak extra RSS MiB | memory vs materialised |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, name, _ in cases:
        ms, mib = times[(kind, name)], memory[(kind, name)]
        base_ms, base_mib = times[(kind, "materialised")], memory[(kind, "materialised")]
        mem_ratio = f"{mib / base_mib:.2f}x" if mib is not None and base_mib else "n/a"
        mib_text = f"{mib:.1f}" if mib is not None else "n/a"
        lines.append(f"| {kind} | {name} | {ms:.1f} | {ms / base_ms:.2f}x | {mib_text} | {mem_ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(table + "\n\n")
    return table


if __name__ == "__main__":
    main()
