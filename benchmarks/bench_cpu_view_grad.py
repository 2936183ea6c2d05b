"""CPU: forward + backward of ``rk.logprobs`` / ``rk.ppo_loss`` through ``logits[:, :-1]``, before and after.

``logits`` is the model's ``[B, T+1, V]`` output; users pass the view ``logits[:, :-1]``.

  view (new)        the ops see the view's base and the row range; the backward writes a
                    ``[B, T+1, V]`` gradient itself, zeroing only the dropped rows
  view (old)        the ops see the view (``_checks.slice_of_base`` patched to find nothing,
                    i.e. the code before this change); autograd's SliceBackward zero-fills
                    ``[B, T+1, V]`` and copies the ``[B, T, V]`` gradient into it
  contiguous        a ``[B, T, V]`` contiguous input (no view at all), for scale

Median of ``--rounds`` fwd+bwd calls (C++ CPU kernel, fp32), and the peak extra resident
memory of one call (RSS high-water mark reset before it) relative to the RSS before.
Usage: ``python -m benchmarks.bench_cpu_view_grad [--B 4 --T 512 --V 50257 --rounds 5]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

import rlhf_kernels as rk
from rlhf_kernels.ops import _checks

from .bench_cpu_logprobs import peak_extra_rss_mib


def _step(op, x, y, old, adv, mask):
    if op == "logprobs":
        lp, ent = rk.logprobs(x, y, return_entropy=True, backend="cpu")
        loss = lp.sum() + 0.01 * ent.sum()
    else:
        loss = rk.ppo_loss(x, y, old, adv, mask, entropy_coef=0.01, backend="cpu").loss
    loss.backward()


def measure(op, mode, base, y, old, adv, mask, rounds):
    original = _checks.slice_of_base
    if mode == "view (old)":
        _checks.slice_of_base = lambda view: None
    try:
        leaf = base.detach()[:, :-1].contiguous().requires_grad_() if mode == "contiguous" else base

        def call():
            leaf.grad = None
            _step(op, leaf if mode == "contiguous" else leaf[:, :-1], y, old, adv, mask)

        call()  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        leaf.grad = None
        peak = peak_extra_rss_mib(call)
        leaf.grad = None
        return statistics.median(times), peak
    finally:
        _checks.slice_of_base = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--V", type=int, default=50257)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    B, T, V = args.B, args.T, args.V
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(B, T + 1, V, generator=g) * 2).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    old = torch.randn(B, T, generator=g) * 0.5 - 11
    adv = torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.1
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    grad_mib = base.numel() * base.element_size() / 2**20
    print(f"# fwd+bwd through logits[:, :-1], cpu backend, fp32, B={B} T={T} (N={B * T}) V={V}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"commit {commit}; one [B, T+1, V] gradient = {grad_mib:.0f} MiB; median of {args.rounds}")
    print()
    print("| op | input | fwd+bwd ms | peak extra RSS MiB |")
    print("|---|---|---|---|")
    for op in ("logprobs", "ppo_loss"):
        for mode in ("view (old)", "view (new)", "contiguous"):
            ms, peak = measure(op, mode, base, y, old, adv, mask, args.rounds)
            peak_s = "n/a" if peak is None else f"{peak:.0f}"
            print(f"| {op} | {mode} | {ms:.1f} | {peak_s} |", flush=True)


if __name__ == "__main__":
    main()
