"""Host time of the ops' Python: what a call costs the CPU around its kernels.

    python -m benchmarks.host_overhead [--reps 7] [--calls 300] [--out benchmarks/results/cpu-host-overhead]

Why: on an H200 the PPO step at micro-batch sizes is bound by the host, not the GPU (bf16 4096 x 50257:
1.6 ms per forward + backward against a ~0.2 ms kernel; benchmarks/results/nvidia-h200/NOTES.md, run 5). The
target check's host sync (on by default, DESIGN §1) drains the queue per call, so the CPU's time and the
kernels' add up instead of overlapping; this measures the CPU's part, on any machine.

Each case runs on tiny CPU tensors ([1, 4, 16]), where the kernels take next to nothing, so the time per call
is the Python, the dispatcher and autograd. ``ppo_loss cuda-path`` is the CUDA backend's fused
forward-with-gradient path (``ppo_loss_fused``) with the CUDA kernels replaced by a CPU stub registered for
``rlhf_kernels_C::ppo_fwd_loss`` in this process only (``torch.library``), so the path's own Python runs as on a
GPU, minus the device's launch latency (``GRPO``: with ``loss_agg="seq-mean-token-mean"``). ``ppo_loss triton-path``
is the Triton backend's route with its launchers stubbed (``_stub_triton_ppo``): the forward-with-gradient
(``RLHF_KERNELS_TRITON_PPO=fused``, the default) against the forward + backward kernels (``two-pass``), each without
the Triton launcher's own time (one launch against two). Cases are interleaved
and repeated (``--reps``); each repetition's time is the mean over ``--calls`` calls, and the best repetition is the
headline (a shared CPU only ever adds time), with the median and the slowest beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

import rlhf_kernels as rk
from rlhf_kernels import _ext
from rlhf_kernels.ops import ppo as ppo_ops

from . import common

SHAPE = (1, 4, 16)


def _stub_ppo_fwd_loss(logits, targets, old_logp, advantages, ref_logp, mask, *scalars):
    """The CUDA op's outputs with the right shapes: (term, logp, entropy, kl, clipped, lse), dlogits, the loss and
    the two means."""
    B, T = logits.shape[:2]
    stats = [torch.zeros(B, T) for _ in range(6)]
    with_grad = scalars[11] if len(scalars) > 11 else True  # (the dispatcher drops trailing defaults)
    grad = torch.zeros_like(logits) if with_grad else logits.new_empty(0)
    return stats + [grad, torch.zeros(()), torch.zeros(2)]


def _stub_triton_ppo():
    """The Triton PPO launchers replaced by functions returning outputs of the right shapes (``triton/ppo.py``,
    ``triton/aggregate.py``), so a
    ``ppo_loss`` call on the Triton route runs its own Python and PyTorch glue on CPU tensors, minus the kernels."""
    from rlhf_kernels.triton import aggregate as triton_aggregate
    from rlhf_kernels.triton import ppo as triton_ppo

    def stats(rows):
        return tuple(torch.zeros(rows.shape[:2]) for _ in range(6))

    def fused(rows, *args, out=None):
        return stats(rows) + (torch.zeros_like(rows) if out is None else out,)

    def backward(g_term, g_logp, g_ent, g_kl, rows, *args, out=None):
        return torch.zeros_like(rows) if out is None else out

    def weights(mask, loss_agg):
        return torch.zeros(mask.shape), torch.zeros(1)

    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.multiple(triton_ppo, ppo_fused_fwd=fused, ppo_term_fwd=lambda rows, *a: stats(rows),
                                            ppo_term_bwd=backward))
    stack.enter_context(mock.patch.multiple(triton_aggregate, loss_weights=weights,
                                            loss_sums=lambda *a: (torch.zeros(()), torch.zeros(2))))
    return stack


def _cases() -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    B, T, V = SHAPE
    x = torch.randn(B, T, V, generator=g)
    ref_x = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    old, adv = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)

    def leaf():
        return x.clone().requires_grad_()

    def ppo_fused(loss_agg="token-mean"):
        with mock.patch.object(ppo_ops, "resolve_for", lambda *a: "cuda"):
            rk.ppo_loss(leaf(), y, old, adv, mask, loss_agg=loss_agg).loss.backward()

    def ppo_forward():
        with mock.patch.object(ppo_ops, "resolve_for", lambda *a: "cuda"), torch.no_grad():
            rk.ppo_loss(x, y, old, adv, mask)

    def ppo_triton(path):  # (main installs the stubs and lets "triton" run on CPU tensors for the whole run)
        os.environ["RLHF_KERNELS_TRITON_PPO"] = path
        rk.ppo_loss(leaf(), y, old, adv, mask, backend="triton").loss.backward()

    def ppo_triton_forward():
        with torch.no_grad():
            rk.ppo_loss(x, y, old, adv, mask, backend="triton")

    cases = {
        "logprobs fwd": lambda: rk.logprobs(x, y, backend="cpu"),
        "logprobs fwd+bwd": lambda: rk.logprobs(leaf(), y, backend="cpu").sum().backward(),
        "kl_divergence fwd+bwd": lambda: rk.kl_divergence(leaf(), ref_x, backend="cpu").sum().backward(),
        "ppo_loss fwd (no grad)": lambda: rk.ppo_loss(x, y, old, adv, mask, backend="cpu"),
        "ppo_loss fwd+bwd": lambda: rk.ppo_loss(leaf(), y, old, adv, mask, backend="cpu").loss.backward(),
    }
    if importlib.util.find_spec("triton") is not None:
        cases["ppo_loss triton-path fwd+bwd (fused)"] = lambda: ppo_triton("fused")
        cases["ppo_loss triton-path fwd+bwd (two-pass)"] = lambda: ppo_triton("two-pass")
        cases["ppo_loss triton-path fwd (no grad)"] = ppo_triton_forward
    if _ext.has_cuda_kernels():  # the op's schema exists only in an extension built with its CUDA kernels
        cases["ppo_loss cuda-path fwd+bwd"] = ppo_fused
        cases["ppo_loss cuda-path fwd+bwd, GRPO"] = lambda: ppo_fused("seq-mean-token-mean")
        cases["ppo_loss cuda-path fwd (no grad)"] = ppo_forward
    return cases


def measure(reps: int, calls: int) -> list[tuple[str, float, float, float]]:
    """(case, best, median, slowest) of the per-call time in µs over ``reps`` interleaved repetitions."""
    cases = _cases()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            for _ in range(max(calls // 10, 3)):  # warm-up
                fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return [(name, min(v), statistics.median(v), max(v)) for name, v in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="folder for host_overhead.md (printed either way)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.calls < 1:
        raise SystemExit("--reps and --calls must be at least 1")
    torch.set_num_threads(1)  # the host's per-call cost, not a thread pool's start-up
    lib = None
    if _ext.has_cuda_kernels():
        lib = torch.library.Library("rlhf_kernels_C", "IMPL")
        lib.impl("ppo_fwd_loss", _stub_ppo_fwd_loss, "CPU")
    triton_setting = os.environ.get("RLHF_KERNELS_TRITON_PPO")
    try:
        with contextlib.ExitStack() as stack:
            if importlib.util.find_spec("triton") is not None:
                stack.enter_context(_stub_triton_ppo())
                resolve = ppo_ops.resolve_for
                stack.enter_context(mock.patch.object(
                    ppo_ops, "resolve_for", lambda op, t, backend, impl: backend if backend == "triton" else resolve(
                        op, t, backend, impl)))
            rows = measure(args.reps, args.calls)
    finally:
        if triton_setting is None:
            os.environ.pop("RLHF_KERNELS_TRITON_PPO", None)
        else:
            os.environ["RLHF_KERNELS_TRITON_PPO"] = triton_setting
        if lib is not None:  # the stub leaves with the run: the real op has no CPU kernel
            lib._destroy()
    lines = [f"# Host time per call, tiny CPU tensors {'x'.join(map(str, SHAPE))}", "",
             common.stamp_line(common.environment(torch.device("cpu"))), "",
             f"best of {args.reps} interleaved repetitions of {args.calls} calls each", "",
             "| case | µs per call | median | slowest |", "|---|---|---|---|"]
    lines += [f"| {name} | {best:.0f} | {med:.0f} | {worst:.0f} |" for name, best, med, worst in rows]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_overhead.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
