"""One call of each bandwidth-bound kernel inside a profiler window, for Nsight Compute.

Why: the H100 runs left the forward row reductions at 70-80 % of the copy
bandwidth and the fused PPO paths far from their targets, and wall-clock
timing alone cannot say whether a kernel is issue-bound, latency-bound
(occupancy, loads in flight) or waiting on memory. Every case is warmed up
first (Triton autotuning, CUDA lazy loading) outside the window; then
``cudaProfilerStart`` / ``cudaProfilerStop`` bracket exactly one call, so
``ncu --profile-from-start off`` sees only the kernels of interest::

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats --csv python -m benchmarks.profile_kernels

``benchmarks/gpu_suite.sh profile`` runs exactly that and keeps the CSV and a
summary. Without a profiler the script still runs (the window calls are no-ops
then) and prints each case's CUDA-event time, so it doubles as a smoke test.

Cases (``--cases``, default all), bf16 ``[N, V]`` logits (``--shape``, default
8192x151936): ``logprobs`` forward (entropy on) and backward, ``kl`` forward
and backward, ``ppo`` forward + backward (Triton two-kernel path and each CUDA
fused path), each on the ``triton`` and ``cuda`` backends where they exist.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Dict, List, Tuple

import torch

if __package__ in (None, ""):  # run as a plain script: make `rlhf_kernels` importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rlhf_kernels as rk  # noqa: E402
from rlhf_kernels import _ext  # noqa: E402

CUDA_PPO_PATHS = ("global", "two-pass", "cluster", "shared", "l2", "pipe")


def _ppo_path_runs(path: str, v: int, dtype: torch.dtype) -> bool:
    """Whether the forced CUDA PPO ``path`` can run for rows of ``v`` (the shared-memory row cannot hold
    V = 151936 in bf16: forcing it raises, which ended the H200 run's profile at that case)."""
    if path in ("global", "two-pass", "l2"):
        return True
    from rlhf_kernels.ops.ppo import CUDA_PPO_PATHS as codes

    plan = _ext.load().ppo_plan(v, str(dtype).replace("torch.", ""), codes[path], True, torch.cuda.current_device())
    return plan[0] != "none"


def _inputs(n: int, v: int, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(n, v, device="cuda", dtype=dtype, generator=g) * 2
    ref = torch.randn(n, v, device="cuda", dtype=dtype, generator=g) * 2
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    old = torch.full((1, n), -11.0, device="cuda")
    adv = torch.randn(1, n, device="cuda", generator=g)
    mask = torch.ones(1, n, device="cuda")
    return dict(logits=logits, ref=ref, targets=targets, old=old, adv=adv, mask=mask)


def cases(x: Dict[str, torch.Tensor]) -> List[Tuple[str, Callable[[], None], Dict[str, str]]]:
    """``(name, fn, env)``: ``fn`` runs the kernels to profile once; ``env`` is set around it."""
    backends = ["triton"] + (["cuda"] if _ext.has_cuda_kernels() else [])
    logits, ref, targets = x["logits"], x["ref"], x["targets"]
    out: List[Tuple[str, Callable[[], None], Dict[str, str]]] = []
    for b in backends:
        out.append((f"logprobs_fwd/{b}", lambda b=b: rk.logprobs(logits, targets, return_entropy=True, backend=b), {}))

        def lp_step(b=b):
            leaf = logits.detach().requires_grad_(True)
            lp, ent = rk.logprobs(leaf, targets, return_entropy=True, backend=b)
            (lp.sum() + ent.sum()).backward()

        out.append((f"logprobs_fwd+bwd/{b}", lp_step, {}))
        out.append((f"kl_fwd/{b}", lambda b=b: rk.kl_divergence(logits, ref, backend=b), {}))

        def kl_step(b=b):
            leaf = logits.detach().requires_grad_(True)
            rk.kl_divergence(leaf, ref, backend=b).sum().backward()

        out.append((f"kl_fwd+bwd/{b}", kl_step, {}))

        def ppo_step(b=b):
            leaf = logits.detach().requires_grad_(True)
            rk.ppo_loss(leaf.unsqueeze(0), targets.unsqueeze(0), x["old"], x["adv"], x["mask"], backend=b).loss.backward()

        paths = [p for p in CUDA_PPO_PATHS if _ppo_path_runs(p, logits.shape[-1], logits.dtype)] if b == "cuda" else [""]
        for path in paths:
            name = f"ppo_fwd+bwd/{b}" + (f"/{path}" if path else "")
            out.append((name, ppo_step, {"RLHF_KERNELS_CUDA_PPO": path} if path else {}))
    return out


def _with_env(env: Dict[str, str], fn: Callable[[], None]) -> None:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fn()
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


# Columns of the summary, by Nsight Compute metric name (those of the four sections gpu_suite.sh asks for).
SUMMARY_METRICS = (
    ("Duration", "time"),
    ("DRAM Throughput", "DRAM %"),
    ("Memory Throughput", "mem %"),
    ("Compute (SM) Throughput", "SM %"),
    ("Achieved Occupancy", "occupancy %"),
    ("Registers Per Thread", "regs"),
    ("Block Size", "block"),
    ("Grid Size", "grid"),
    ("Warp Cycles Per Issued Instruction", "cycles/issue"),
)


def summarize(csv_path: str) -> str:
    """Markdown table, one row per profiled kernel (in launch order), from ``ncu --csv --page details`` output."""
    import csv

    with open(csv_path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu may prefix the CSV with ==PROF== lines
    kernels: Dict[str, Dict[str, str]] = {}
    for row in csv.DictReader(lines):
        k = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        unit = row.get("Metric Unit", "")
        k[row["Metric Name"]] = row["Metric Value"] + (f" {unit}" if unit and unit != "%" else "")
    head = "| id | kernel | " + " | ".join(label for _, label in SUMMARY_METRICS) + " |"
    out = [head, "|" + "---|" * (len(SUMMARY_METRICS) + 2)]
    for kid, k in sorted(kernels.items(), key=lambda kv: int(kv[0])):
        name = k["name"].split("(")[0].replace("void ", "").replace("rlhf_kernels::cuda::", "")[:56]
        out.append(f"| {kid} | {name} | " + " | ".join(k.get(m, "") for m, _ in SUMMARY_METRICS) + " |")
    return "\n".join(out) + "\n"


STALL_METRIC = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def stall_table(csv_path: str, top: int = 10) -> str:
    """Markdown of warp stall reasons per kernel from ``ncu --csv --page raw`` with the
    ``smsp__average_warps_issue_stalled_*_per_issue_active.ratio`` metrics (``gpu_suite.sh stalls``).

    Each value is the average number of warps stalled for that reason per issued instruction; over all reasons
    they add up to about the cycles per issued instruction. Rows: the ``top`` reasons by their largest value,
    columns: the kernels in launch order (short name, grid and block, which tell the PPO paths apart).
    """
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.reader(line for line in f if line.startswith('"')))
    if len(rows) < 2:
        raise ValueError(f"{csv_path}: no ncu raw rows (header, units, kernels) in it")
    header, data = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]  # rows[1] holds the units
    reasons = {i: m.group(1) for i, name in enumerate(header) if (m := STALL_METRIC.match(name))}
    if not reasons or not data:
        raise ValueError(f"{csv_path}: no stall-reason metrics or no kernels in it")
    col = {name: i for i, name in enumerate(header)}

    def value(r: List[str], i: int) -> float:
        try:
            return float(r[i].replace(",", ""))
        except ValueError:
            return 0.0

    labels = []
    for r in data:
        name = r[col["Kernel Name"]].split("(")[0].replace("void ", "").split("::")[-1]
        grid, block = (r[col[k]].strip("()").split(",")[0].strip() if k in col else "?"
                       for k in ("Grid Size", "Block Size"))
        labels.append(f"{r[col['ID']]}: {name[:44]} {grid}x{block}")
    ranked = sorted(reasons, key=lambda i: -max(value(r, i) for r in data))[:top]
    out = ["| stall reason (warps per issued instruction) | " + " | ".join(labels) + " |",
           "|" + "---|" * (len(labels) + 1)]
    for i in ranked:
        out.append(f"| {reasons[i]} | " + " | ".join(f"{value(r, i):.2f}" for r in data) + " |")
    out.append("| **all reasons** | " + " | ".join(f"{sum(value(r, i) for i in reasons):.2f}" for r in data) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8192x151936", help="NxV of the bf16 logits")
    p.add_argument("--cases", default="", help="comma list of case-name prefixes (default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--summarize", metavar="NCU_CSV", default=None,
                   help="instead of running: print a markdown summary of an `ncu --csv --page details` file")
    p.add_argument("--stalls", metavar="NCU_RAW_CSV", default=None,
                   help="instead of running: print the warp stall reasons of an `ncu --csv --page raw` file")
    args = p.parse_args(argv)
    if args.stalls:
        sys.stdout.write(stall_table(args.stalls))
        return 0
    if args.summarize:
        sys.stdout.write(summarize(args.summarize))
        return 0
    if not torch.cuda.is_available():
        print("profile_kernels: no CUDA device", file=sys.stderr)
        return 1
    n, v = (int(t) for t in args.shape.lower().split("x"))
    x = _inputs(n, v, torch.bfloat16)
    wanted = [c for c in args.cases.split(",") if c]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cudart = torch.cuda.cudart()
    for name, fn, env in cases(x):
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        try:  # one failing case (a path that cannot run here, say) must not cost the others their profile
            for _ in range(args.warmup):
                _with_env(env, fn)
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print(f"{name:32s} skipped: {str(exc).splitlines()[0][:160]}", flush=True)
            continue
        cudart.cudaProfilerStart()
        start.record()
        _with_env(env, fn)
        end.record()
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        print(f"{name:32s} {start.elapsed_time(end):8.3f} ms", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
