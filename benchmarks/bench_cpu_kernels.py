"""CPU micro-benchmarks of every C++ CPU kernel (pytest-benchmark; ``make bench-cpu``).

Each op of the suite that has a C++ CPU kernel (``logprobs+ent``, ``kl_divergence``, ``ppo_loss``, ``gae``) is
timed on the ``cpu`` backend against the suite's eager formula and chunked loop (``benchmarks/providers.py``),
forward (under ``no_grad``) and forward + backward (upstream gradient 1 on every output), with the same inputs
and step functions as ``rlhf-kernels bench`` (``benchmarks/run.py``'s ``step_fns``). Shapes: N = 2048 tokens,
V = 50257 (GPT-2) fp32 for the logits ops, B x T = 64 x 1024 for ``gae`` (``RLHF_BENCH_N``, ``RLHF_BENCH_V``,
``RLHF_BENCH_B``, ``RLHF_BENCH_T``). Before timing, each provider's outputs are checked against eager's.

At the end a table of medians and speed-ups over eager is printed (and written to ``RLHF_BENCH_KERNELS_REPORT``
when set). ``bench_cpu_logprobs.py`` covers ``logprobs`` alone, with TRL's row loop and peak memory.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from benchmarks.providers import Case
from benchmarks.report import emit
from benchmarks.bench_cpu_logprobs import N, ROUNDS, V, WARMUP  # shapes and rounds as the log-prob benchmark's
from benchmarks.run import all_ops, logits_case, step_fns

B = int(os.environ.get("RLHF_BENCH_B", 64))
T = int(os.environ.get("RLHF_BENCH_T", 1024))
OPS = ("logprobs+ent", "kl_divergence", "ppo_loss", "gae")
PROVIDERS = ("cpu", "eager", "chunked")
MODES = ("fwd", "fwd+bwd")
RESULTS: dict = {}
DEVICE = torch.device("cpu")


def _case(op: str) -> Case:
    if op == "gae":
        return Case(op, N=B * T, B=B, T=T)
    return logits_case(op, N, V)


@pytest.fixture(scope="module")
def specs():
    return all_ops()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    lines = [
        f"\nCPU kernel benchmark: logits ops N={N} V={V} fp32, gae B={B} T={T} fp32; {torch.get_num_threads()} "
        f"threads, {platform.processor() or platform.machine()}, torch {torch.__version__}; median of {ROUNDS} "
        f"rounds after {WARMUP} untimed",
        "",
        "| op | mode | " + " | ".join(f"{p} ms" for p in PROVIDERS) + " | cpu speed-up vs eager | vs chunked |",
        "|---|---|" + "---|" * (len(PROVIDERS) + 2),
    ]
    for op in OPS:
        for mode in MODES:
            row = RESULTS.get((op, mode), {})
            if not row:
                continue
            cells = [f"{row[p]:.1f}" if p in row else "-" for p in PROVIDERS]
            ours = row.get("cpu")
            ratios = [f"{row[p] / ours:.2f}x" if ours and p in row else "-" for p in ("eager", "chunked")]
            lines.append(f"| {op} | {mode} | " + " | ".join(cells + ratios) + " |")
    print()  # off pytest's progress line
    emit("\n".join(lines).lstrip() + "\n", os.environ.get("RLHF_BENCH_KERNELS_REPORT"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
def test_cpu_kernel(benchmark, specs, op, provider, mode):
    spec = specs[op]
    if mode not in spec.modes:
        pytest.skip(f"{op} has no {mode}")
    case = _case(op)
    why = spec.providers[provider].reason(case, DEVICE)
    if why is not None:
        pytest.skip(why)
    inputs = spec.make_inputs(case, DEVICE, 0)
    if mode == "fwd":  # the provider's outputs against eager's, once
        with torch.no_grad():
            expected = spec.providers["eager"].build(inputs)()
            got = spec.providers[provider].build(inputs)()
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    (step,) = step_fns(spec, spec.providers[provider], [inputs], mode)
    benchmark.group = f"{op} {mode}"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    RESULTS.setdefault((op, mode), {})[provider] = benchmark.stats.stats.median * 1e3


def test_cases_are_full_size():
    """Every logits op runs at N x V tokens (``ppo_loss`` as N / 1024 sequences of 1024 when N allows)."""
    case = _case("ppo_loss")
    assert case.B * case.T == N and case.V == V
