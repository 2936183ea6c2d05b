"""Which GPU backend the committed results say each op should try first: the data behind ``GPU_PREFERENCE``.

``rlhf_kernels/ops/_dispatch.py``'s ``GPU_PREFERENCE`` orders the CUDA C++ and Triton backends per op, and it
should follow the committed benchmarks (issue 9). This reads a device folder's ``results.csv``, pairs the
``cuda`` and ``triton`` rows of every cell (op, mode, dtype, shape) measured in the same commit, and reports
per dispatch op: the cells each backend won, the geometric mean of the cuda / triton time ratio, the
training-step ratio alone (``fwd+bwd``, what a training loop pays), the order the data suggest, and the order
in use now::

    python -m benchmarks.preference benchmarks/results/nvidia-h200
    python -m benchmarks.preference benchmarks/results/nvidia-h200 --out preference.md

The suggestion puts CUDA first when it wins the training step (geometric mean of the ``fwd+bwd`` ratios
below 1), or the forward when no training step was measured. Op variants map onto the op they dispatch
through: ``logprobs+ent`` is ``logprobs``, ``linear_cross_entropy`` / ``linear_ppo_loss`` (and their
``+vocab`` / ``+recompute`` / ``+rows`` rows) are ``linear_logprobs``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from rlhf_kernels.ops._dispatch import GPU_PREFERENCE

from .report import emit, read_csv

Cell = Tuple[str, str, str, str, str]  # (op as measured, mode, dtype, shape, commit)


def dispatch_op(op: str) -> str:
    """The ``GPU_PREFERENCE`` key a benchmark op is dispatched through."""
    base = op.split("+")[0] if op.startswith("linear_") else op
    if base in ("logprobs+ent",):
        return "logprobs"
    if base in ("linear_cross_entropy", "linear_ppo_loss", "linear_logprobs"):
        return "linear_logprobs"
    return base


def paired_ratios(rows: Sequence[Dict[str, object]]) -> Dict[str, Dict[str, List[float]]]:
    """``{dispatch op: {mode: [cuda ms / triton ms per cell]}}`` over cells where both ran ``ok`` in one commit."""
    times: Dict[Cell, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("status") != "ok" or r.get("provider") not in ("cuda", "triton"):
            continue
        ms = r.get("ms")
        if not isinstance(ms, (int, float)) or not ms > 0:
            continue
        cell = (str(r["op"]), str(r["mode"]), str(r["dtype"]), str(r["shape"]), str(r.get("commit", "")))
        times[cell][str(r["provider"])] = float(ms)
    out: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for (op, mode, _dtype, _shape, _commit), t in times.items():
        if "cuda" in t and "triton" in t:
            out[dispatch_op(op)][mode].append(t["cuda"] / t["triton"])
    return out


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def suggestion(by_mode: Dict[str, List[float]]) -> Optional[Tuple[str, str]]:
    """The order the ratios suggest: CUDA first when its training step (else its forward) is faster on the
    geometric mean; ``None`` with nothing paired."""
    for mode in ("fwd+bwd", "fwd"):
        if by_mode.get(mode):
            return ("cuda", "triton") if _geomean(by_mode[mode]) < 1.0 else ("triton", "cuda")
    return None


def report(folder: str) -> str:
    rows = read_csv(os.path.join(folder, "results.csv"))
    ratios = paired_ratios(rows)
    lines = [
        f"## Backend order from {os.path.basename(os.path.normpath(folder))}",
        "",
        "| op | mode | cells | cuda wins | cuda / triton (geomean) | suggested | in use |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in sorted(ratios):
        suggested = suggestion(ratios[op])
        in_use = GPU_PREFERENCE.get(op, ("triton", "cuda"))
        for mode in sorted(ratios[op]):
            values = ratios[op][mode]
            wins = sum(v < 1.0 for v in values)
            flag = "" if suggested is None or tuple(in_use) == suggested else " **differs**"
            lines.append(f"| {op} | {mode} | {len(values)} | {wins} | {_geomean(values):.3f} | "
                         f"{' > '.join(suggested) if suggested else '-'} | {' > '.join(in_use)}{flag} |")
    if not ratios:
        lines.append("| (no cell with both cuda and triton rows) | | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a device folder of benchmarks/results (with results.csv)")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.folder, "results.csv")):
        print(f"preference: no results.csv in {args.folder}", file=sys.stderr)
        return 2
    text = report(args.folder)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
