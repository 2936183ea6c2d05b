"""Where the fused PPO step's time goes inside its kernel (GPU only): the kernel's probe, timed and stamped.

    python -m benchmarks.probe_ppo [--n 8192] [--v 151936] [--dtype bf16] [--paths cluster,global] [--out DIR]

Why: issue 9 asks the fused forward-with-gradient for 85% of its one-read-one-write floor; on an H200 it
runs at ~65% (1.81 ms against 1.17 at bf16 8192 x 151936), with every CTA the plan allows resident and
neither DRAM (54%) nor the SM (57%) saturated (ncu, ``benchmarks/results/nvidia-h200/logs/run3``). Aggregate
counters cannot say which part of a CTA's life leaves DRAM idle, and the two paths tried to hide it (``pipe``,
``l2``) were slower. The probe instantiation of the same kernel (``csrc/cuda/ppo_probe.cuh``) answers with
two measurements, per path (``--paths``; not ``pipe``, which has no probe):

1. **Stage prices.** CUDA-event times (median, L2 flushed) of the production kernel (``ppo_fwd``), of the
   probe with nothing left out (the probe's own cost), and of the probe leaving one stage out: the cluster's
   statistics exchange, thread 0's row tail, sweep 2, or sweep 2's arithmetic (a plain copy of the cached
   logits instead of their gradient), alone and combined, plus the forward alone. The difference to the full
   probe is what that stage costs on the critical path; each row also gives % of the one-read-one-write
   floor, a device copy of the logits timed in the same run. The variants' outputs are wrong; timing only.
   One row is an alternative instead, with the same results (checked bit for bit): the cluster's statistics
   pushed into each peer's shared memory before the barrier and merged locally, so no CTA reads a peer after it
   and none waits at a closing barrier.
2. **Stamps.** One probed launch with thread 0 of every CTA stamping its phases (clock64) and its start and end
   (global timer): per-phase durations, resident CTAs per SM, the share of SM time during which no resident
   CTA was loading or storing (DRAM sees nothing from that SM then), how soon a freed slot is refilled, and a
   timeline plot of a few SMs.

Before anything is timed, the probe with nothing left out is checked bit-identical to the production kernel
(outputs and gradient). Writes ``probe.md`` (also printed), ``probe_<path>.npz`` (the raw stamps) and
``probe_<path>.png`` under ``--out``. ``benchmarks/gpu_suite.sh probe`` runs it on the lent GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .common import TimerConfig, environment, stamp_line, time_fn
from .probe_analysis import (
    COPY_SWEEP2,
    NO_EXCHANGE,
    NO_ROW_TAIL,
    NO_SWEEP2,
    PUSH_EXCHANGE,
    RELAXED_ARRIVE,
    SLOTS,
    format_summary,
    plot_timeline,
    summarize,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KL_COEF, CLIP = 0.05, 0.2
ENTROPY_COEF = 0.0  # as the benchmark suite's ppo_loss: sweep 2 takes the kernel's no-entropy gradient
ENTROPY_BONUS = 0.01  # the one row timed with an entropy bonus (the full gradient formula)

# (label, skip bits, cluster path only); the variants of stage prices, after the production kernel
VARIANTS: Tuple[Tuple[str, int, bool], ...] = (
    ("probe, nothing left out", 0, False),
    ("no cluster exchange", NO_EXCHANGE, True),
    ("no row tail", NO_ROW_TAIL, False),
    ("no exchange, no row tail", NO_EXCHANGE | NO_ROW_TAIL, True),
    ("sweep 2 copies (no gradient math)", COPY_SWEEP2, True),
    ("copy, no exchange, no row tail", COPY_SWEEP2 | NO_EXCHANGE | NO_ROW_TAIL, True),
    ("no sweep 2 (load + statistics only)", NO_SWEEP2, False),
    ("push exchange, no closing barrier (same results)", PUSH_EXCHANGE, True),
    ("closing arrive without its release fence (same results)", RELAXED_ARRIVE, True),
)


def _inputs(n: int, v: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn((1, n, v), device="cuda", generator=gen) * 3).to(dtype)
    return {
        "x": x,
        "y": torch.randint(0, v, (1, n), device="cuda", generator=gen),
        "old": torch.randn((1, n), device="cuda", generator=gen) - 3,
        "adv": torch.randn((1, n), device="cuda", generator=gen),
        "ref": torch.randn((1, n), device="cuda", generator=gen) - 3,
        "w": torch.full((1, n), 1.0 / n, device="cuda"),  # token-mean weights
    }


def _args(t: Dict[str, torch.Tensor], with_grad: bool, path_code: int, entropy_coef: float = ENTROPY_COEF) -> tuple:
    """ppo_fwd's arguments up to and including ``path`` (k3 KL to a reference, no dual clip)."""
    return (t["x"], t["y"], t["old"], t["adv"], t["ref"], t["w"] if with_grad else None, 1.0, -100, KL_COEF, 3,
            entropy_coef, CLIP, CLIP, None, path_code)


def _flat(out: List[torch.Tensor]) -> List[torch.Tensor]:
    return [o for o in out if o.numel()]


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def probe_path(path: str, t: Dict[str, torch.Tensor], floor_ms: float, cfg: TimerConfig, out_dir: str,
               log: Callable[[str], None]) -> Optional[str]:
    """Stage prices and stamps of one path; returns its markdown section (None when the path cannot run here)."""
    from rlhf_kernels import _ext
    from rlhf_kernels.ops.ppo import CUDA_PPO_PATHS

    C = _ext.load()
    v, dtype = t["x"].shape[-1], t["x"].dtype
    code = CUDA_PPO_PATHS[path]
    plan = C.ppo_plan(v, str(dtype).replace("torch.", ""), code, True, torch.cuda.current_device())
    if plan[0] == "none":
        log(f"{path}: cannot run for V = {v} {dtype} on this GPU; skipped")
        return None
    _, cluster, threads, smem = plan
    device = t["x"].device
    production = _flat(torch.ops.rlhf_kernels_C.ppo_fwd(*_args(t, True, code)))
    ctas = t["x"].shape[0] * t["x"].shape[1] * cluster
    stamps = torch.zeros((ctas, SLOTS), dtype=torch.int64, device=device)
    probed = _flat(C.ppo_fwd_probe(*_args(t, True, code), stamps, 0))
    identical = _same(probed, production)
    # the alternatives to the production exchange must give the same bits
    alternatives = {"Push exchange": PUSH_EXCHANGE, "Relaxed closing arrive": RELAXED_ARRIVE}
    alternatives_identical = {
        name: _same(_flat(C.ppo_fwd_probe(*_args(t, True, code), None, skip)), production)
        for name, skip in alternatives.items()
    } if path == "cluster" and cluster <= 8 else {}
    torch.cuda.synchronize()
    raw = stamps.cpu().numpy()
    np.savez_compressed(os.path.join(out_dir, f"probe_{path}.npz"), stamps=raw)

    rows: List[Tuple[str, float]] = []

    def timed(label: str, call: Callable[[], object]) -> float:
        ms = time_fn([call], device, cfg).median_ms
        rows.append((label, ms))
        log(f"{path:<8} {label:<40} {ms:8.3f} ms  {100 * floor_ms / ms:5.1f}% of the copy")
        return ms

    timed("production kernel (ppo_fwd)", lambda: torch.ops.rlhf_kernels_C.ppo_fwd(*_args(t, True, code)))
    timed(f"production, entropy bonus {ENTROPY_BONUS} (full sweep 2)",
          lambda: torch.ops.rlhf_kernels_C.ppo_fwd(*_args(t, True, code, ENTROPY_BONUS)))
    timed("probe + stamps", lambda: C.ppo_fwd_probe(*_args(t, True, code), stamps, 0))
    for label, skip, cluster_only in VARIANTS:
        if cluster_only and path != "cluster":
            continue
        timed(label, lambda s=skip: C.ppo_fwd_probe(*_args(t, True, code), None, s))
    timed("forward only (no gradient)", lambda: torch.ops.rlhf_kernels_C.ppo_fwd(*_args(t, False, 0)))
    base = dict(rows)["probe, nothing left out"]

    lines = [f"## `{path}`: {cluster} CTA(s) per row, {threads} threads, {smem / 1024:.0f} KB shared memory per CTA",
             "", f"Probe with nothing left out bit-identical to the production kernel: **{'yes' if identical else 'NO'}**.",
             *(f"{name} bit-identical to the production kernel: **{'yes' if same else 'NO'}**."
               for name, same in alternatives_identical.items()),
             "", "| variant | ms | % of the copy's time | vs the full probe |", "|---|---|---|---|"]
    for label, ms in rows:
        lines.append(f"| {label} | {ms:.3f} | {100 * floor_ms / ms:.1f}% | {ms - base:+.3f} ms |")
    lines.append("")
    try:
        summary = summarize(raw)
        lines.append(format_summary(f"`{path}` stamps (one launch)", summary))
        png = plot_timeline(raw, os.path.join(out_dir, f"probe_{path}.png"),
                            f"fused PPO step, path {path}: phases of the CTAs on the first SMs")
        lines.append(f"![{path} timeline]({os.path.basename(png)})\n")
    except ValueError as err:  # stamps that do not read right are a finding, not a crash
        lines.append(f"Stamps unusable: {err}\n")
    return "\n".join(lines)


def _copy_ms(x: torch.Tensor, cfg: TimerConfig) -> float:
    """Median time of a device copy of ``x``: one read and one write of the logits, the step's floor."""
    dst = torch.empty_like(x)
    return time_fn([lambda: dst.copy_(x)], x.device, cfg).median_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--paths", default="cluster,global", help="CUDA PPO paths to probe (global, shared, cluster, l2)")
    p.add_argument("--out", default="probe_out", help="folder for probe.md, the stamps and the plots")
    args = p.parse_args(argv)
    paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in paths if s not in ("global", "shared", "cluster", "l2")]
    if bad or not paths:
        p.error(f"--paths: {bad or 'none given'}; choose from global, shared, cluster, l2 (pipe has no probe)")
    if args.n < 1 or args.v < 1:
        p.error("--n and --v must be positive")
    if not torch.cuda.is_available():
        print("probe_ppo needs a CUDA GPU", file=sys.stderr)
        return 2
    from rlhf_kernels import _ext

    if not _ext.has_cuda_kernels() or not hasattr(_ext.load(), "ppo_fwd_probe"):
        print("probe_ppo: the extension was built without the CUDA kernels' probe", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    t = _inputs(args.n, args.v, DTYPES[args.dtype])
    cfg = TimerConfig()
    floor_ms = _copy_ms(t["x"], cfg)
    head = [f"# Fused PPO step probe: {args.dtype} {args.n} x {args.v}", "",
            f"{stamp_line(environment(device))}", "",
            (f"One read + one write of the logits (a device copy, same run): **{floor_ms:.3f} ms**. Each row's "
             f"%: the copy's time over the row's. Inputs: k3 KL (coefficient {KL_COEF}), no entropy bonus unless "
             f"a row says so (the suite's setting), clip {CLIP}, token-mean weights."), ""]
    print("\n".join(head), flush=True)
    sections = []
    for path in paths:
        section = probe_path(path, t, floor_ms, cfg, args.out, lambda s: print(s, flush=True))
        if section:
            sections.append(section)
            print(section, flush=True)
    with open(os.path.join(args.out, "probe.md"), "w") as f:
        f.write("\n".join(head + sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
