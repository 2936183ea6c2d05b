"""Which cells of DESIGN.md §6's benchmark grid a device's committed results cover, and how to fill the rest.

A cell is (op, dtype, mode, shape). It counts as covered when ``results.csv``
has an ``ok`` row for it from one of this package's GPU backends (``triton``
or ``cuda``); for each (op, dtype, mode) the report lists the shapes covered
out of those expected, the providers that ran, the commits the rows were
measured at, and, for the gaps, the ``python -m benchmarks.run`` command that
measures them (``--resume`` skips what is already there)::

    python -m benchmarks.coverage                                   # every GPU folder in benchmarks/results
    python -m benchmarks.coverage benchmarks/results/nvidia-h100-80gb-hbm3 --out coverage.md

The grid (``run.py``'s GPU defaults): logprobs, logprobs+ent, kl_divergence and
ppo_loss at N ∈ {4096, 8192, 16384} x V ∈ {50257, 128256, 151936} in bf16 and
fp32; the fused-linear ops also x H ∈ {2048, 4096}, bf16; gae at its three
B x T scans, fp32; each forward and forward + backward (gae: forward).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Set, Tuple

from .report import emit
from .run import GPU_HS, GPU_NS, GPU_SCAN, GPU_VS

OURS = ("triton", "cuda")
LOGIT_OPS = ("logprobs", "logprobs+ent", "kl_divergence", "ppo_loss")
LINEAR_OPS = ("linear_logprobs", "linear_cross_entropy", "linear_ppo_loss")
_DTYPE_FLAG = {"bfloat16": "bf16", "float32": "fp32"}

Group = Tuple[str, str, str]  # (op, dtype, mode)


def expected_grid() -> Dict[Group, List[str]]:
    """``(op, dtype, mode) -> [shape label]`` of the GPU grid, labels as ``results.csv`` writes them."""
    grid: Dict[Group, List[str]] = {}
    logit_shapes = [f"N={n} V={v}" for n in GPU_NS for v in GPU_VS]
    linear_shapes = [f"N={n} V={v} H={h}" for n in GPU_NS for v in GPU_VS for h in GPU_HS]
    for mode in ("fwd", "fwd+bwd"):
        for op in LOGIT_OPS:
            for dtype in ("bfloat16", "float32"):
                grid[(op, dtype, mode)] = logit_shapes
        for op in LINEAR_OPS:
            grid[(op, "bfloat16", mode)] = linear_shapes
    grid[("gae", "float32", "fwd")] = [f"B={b} T={t}" for b, t in GPU_SCAN]
    return grid


def _shape_arg(label: str) -> str:
    """``"N=8192 V=151936 H=4096"`` -> ``"8192x151936x4096"`` (the ``--shapes`` spelling)."""
    return "x".join(part.split("=", 1)[1] for part in label.split())


def read_rows(csv_path: str) -> List[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def coverage(rows: Iterable[dict]) -> Dict[Group, dict]:
    """Per expected group: ``covered`` / ``missing`` shape labels, ``providers`` and ``commits`` seen."""
    ours: Dict[Group, Set[str]] = defaultdict(set)
    providers: Dict[Group, Set[str]] = defaultdict(set)
    commits: Dict[Group, Set[str]] = defaultdict(set)
    for r in rows:
        if r.get("status") != "ok":
            continue
        group = (r["op"], r["dtype"], r["mode"])
        providers[group].add(r["provider"])
        if r["provider"] in OURS:
            ours[group].add(r["shape"])
            commits[group].add(r.get("commit", "") or "?")
    result = {}
    for group, shapes in expected_grid().items():
        covered = [s for s in shapes if s in ours[group]]
        result[group] = {
            "covered": covered,
            "missing": [s for s in shapes if s not in ours[group]],
            "expected": len(shapes),
            "providers": sorted(providers[group]),
            "commits": sorted(commits[group]),
        }
    return result


def fill_commands(cov: Dict[Group, dict]) -> List[str]:
    """One ``benchmarks.run`` command per (op, dtype) with gaps (both modes, the union of their missing shapes)."""
    gaps: Dict[Tuple[str, str], Set[str]] = defaultdict(set)
    for (op, dtype, _mode), info in cov.items():
        gaps[(op, dtype)].update(info["missing"])
    order = {}
    for (op, dtype, _mode), shapes in expected_grid().items():
        order.setdefault((op, dtype), shapes)
    missing = {key: [s for s in order[key] if s in shapes] for key, shapes in gaps.items() if shapes}
    commands = []
    for (op, dtype), shapes in sorted(missing.items()):
        flag = "--scan-shapes" if op == "gae" else "--shapes"
        mode = "fwd" if op == "gae" else "fwd,fwd+bwd"
        commands.append(
            f"python -m benchmarks.run --ops {op} --dtypes {_DTYPE_FLAG[dtype]} --mode {mode} "
            f"{flag} {','.join(_shape_arg(s) for s in shapes)} --resume"
        )
    return commands


def render(device_dir: str, cov: Dict[Group, dict]) -> str:
    total = sum(info["expected"] for info in cov.values())
    done = sum(len(info["covered"]) for info in cov.values())
    lines = [
        f"## Coverage of {os.path.basename(os.path.normpath(device_dir))}: {done} of {total} cells",
        "",
        "| op | dtype | mode | shapes | providers | commits |",
        "|---|---|---|---|---|---|",
    ]
    for (op, dtype, mode), info in sorted(cov.items()):
        lines.append(
            f"| {op} | {dtype} | {mode} | {len(info['covered'])}/{info['expected']} | "
            f"{', '.join(info['providers']) or '-'} | {', '.join(info['commits']) or '-'} |"
        )
    commands = fill_commands(cov)
    if commands:
        lines += ["", "To fill the gaps:", "", "```"] + commands + ["```"]
    return "\n".join(lines) + "\n"


def gpu_result_dirs(root: str) -> List[str]:
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "*", "results.csv"))
                  if not os.path.basename(os.path.dirname(p)).startswith("cpu-"))


def main(argv: Sequence[str] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", help="device result folders (default: every GPU folder in benchmarks/results)")
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    dirs = args.dirs or gpu_result_dirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    if not dirs:
        print("no GPU results found", file=sys.stderr)
        return 1
    text = ""
    for d in dirs:
        csv_path = os.path.join(d, "results.csv")
        if not os.path.exists(csv_path):
            print(f"{csv_path} does not exist", file=sys.stderr)
            return 2
        text += render(d, coverage(read_rows(csv_path))) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
