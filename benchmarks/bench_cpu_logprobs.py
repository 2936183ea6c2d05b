"""CPU micro-benchmark of the fused log-prob kernel (pytest-benchmark; `make bench-cpu`).

Shape: N = 2048 tokens, V = 50257 (GPT-2), fp32 — on whatever CPU runs it.
Providers:
  fused      rk.logprobs on the C++ CPU kernel (one pass per row, O(N) extra memory)
  eager      torch.log_softmax(logits, -1).gather(-1, y)  (materialises [N, V] fp32)
  row-loop   TRL's fp32 path: per-row logsumexp, then gather (forward only: it is
             what TRL uses to score old-policy / reference log-probs)
Each is timed forward, and fused / eager also forward+backward; the peak extra resident memory of
one forward is measured separately (kernel peak RSS minus RSS before the call).
At the end a table of medians, ratios to eager and peak memory is printed.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import rlhf_kernels as rk
from benchmarks.report import emit

N = int(os.environ.get("RLHF_BENCH_N", 2048))
V = int(os.environ.get("RLHF_BENCH_V", 50257))
ROUNDS = int(os.environ.get("RLHF_BENCH_ROUNDS", 5))
# Untimed calls first. The first few backward calls of a process run 2-20x slower than the rest (2048 x 50257 fp32:
# 1626, 514, 290, 203, 148, then 64-83 ms): the kernels ask for transparent huge pages on their fresh gradient
# buffers (csrc/cpu/row_common.h), and until the process has freed some, the kernel compacts memory to find them.
WARMUP = int(os.environ.get("RLHF_BENCH_WARMUP", 4))
RESULTS: dict = {}


def fused_fwd(logits, targets):
    return rk.logprobs(logits, targets, backend="cpu")


def eager_fwd(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def row_loop_fwd(logits, targets):
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    return picked - lse


PROVIDERS = {"fused": fused_fwd, "eager": eager_fwd, "row-loop": row_loop_fwd}


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_rss_mib(fn) -> float | None:
    """Peak resident memory added while ``fn`` runs (Linux: resets the high-water mark first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _read_status_kib("VmRSS")
        out = fn()
        peak = _read_status_kib("VmHWM")
        del out
        return max(0, peak - before) / 1024
    except (OSError, KeyError):
        return None


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.randn(N, V), torch.randint(0, V, (N,))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    lines = [
        f"\nCPU log-prob benchmark: N={N}, V={V}, fp32, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"median of {ROUNDS} rounds after {WARMUP} untimed",
        "",
        "| provider | fwd ms | fwd+bwd ms | fwd speed-up vs eager | fwd+bwd speed-up vs eager | fwd peak extra MiB |",
        "|---|---|---|---|---|---|",
    ]
    eager = RESULTS.get("eager", {})
    for name in PROVIDERS:
        r = RESULTS.get(name, {})
        fwd, fb, mem = r.get("fwd"), r.get("fwd+bwd"), r.get("mem")

        def ratio(key, value):
            return f"{eager[key] / value:.2f}x" if value and eager.get(key) else "-"

        lines.append(
            f"| {name} | {fwd:.1f} | " if fwd else f"| {name} | - | "
        )
        lines[-1] += (f"{fb:.1f} | " if fb else "- | ") + f"{ratio('fwd', fwd)} | {ratio('fwd+bwd', fb)} | "
        lines[-1] += f"{mem:.1f} |" if mem is not None else "- |"
    print()  # off pytest's progress line
    emit("\n".join(lines).lstrip() + "\n", os.environ.get("RLHF_BENCH_REPORT"))


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward(benchmark, inputs, provider):
    logits, targets = inputs
    fn = PROVIDERS[provider]
    benchmark.group = "forward"
    out = benchmark.pedantic(fn, args=(logits, targets), rounds=ROUNDS, warmup_rounds=WARMUP)
    torch.testing.assert_close(out, eager_fwd(logits, targets), atol=1e-4, rtol=1e-4)
    RESULTS.setdefault(provider, {})["fwd"] = benchmark.stats.stats.median * 1e3
    RESULTS[provider]["mem"] = peak_extra_rss_mib(lambda: fn(logits, targets))


@pytest.mark.parametrize("provider", ["fused", "eager"])
def test_forward_backward(benchmark, inputs, provider):
    logits, targets = inputs
    fn = PROVIDERS[provider]
    leaf = logits.clone().requires_grad_(True)

    def step():
        (grad,) = torch.autograd.grad(fn(leaf, targets).sum(), leaf)
        return grad

    benchmark.group = "forward+backward"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    RESULTS.setdefault(provider, {})["fwd+bwd"] = benchmark.stats.stats.median * 1e3
