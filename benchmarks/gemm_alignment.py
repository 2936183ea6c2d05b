"""The fused-linear GEMMs at a vocabulary that is not a multiple of 8: one GEMM against ``ops/_linear_gemm``'s split.

    python -m benchmarks.gemm_alignment [--rows 4096] [--v 50257] [--h 2048,4096] [--dtype bf16] [--out DIR]

Why: on the H200 (run 6) ``linear_logprobs``' forward at 4096 x 50257 x 2048 bf16 took 8.3 ms for a 1.1 ms
matmul (~100 TFLOP/s), every provider alike, although our chunk buffer's rows were already 16-byte aligned
(``_row_buffer``). The reading: cuBLAS picks its 1-element-aligned kernels when the extent along a matrix's
contiguous dimension (here the vocabulary) is odd, whatever the leading dimension. ``ops/_linear_gemm`` now runs
each such GEMM as an aligned bulk plus a tail of fewer than 8 columns. This script times, for each ``H``, the three
GEMMs of one row chunk of ``--rows`` rows (``2·rows·V·H`` flops each):

* ``logits = hidden @ weight.T``; ``dX = dlogits @ weight``; ``dW = dlogits.T @ hidden`` into a float32
  ``[V, H]`` accumulator (the row path's, for a 16-bit head),

each four ways: ``contiguous`` (a plain ``[rows, V]`` tensor, as eager's ``F.linear``: odd leading dimension and
extent), ``padded`` (one GEMM on the ``_row_buffer`` view: what ran before the split), ``split`` (the shipped
``_linear_gemm`` functions) and ``aligned V`` (the same GEMM at ``V`` rounded up to 64: the ceiling), as ms,
TFLOP/s and % of the ``aligned V`` time; ``split`` is checked against ``padded`` (largest difference relative to
the largest value). If ``split`` does not beat ``padded`` on a GPU, ``SPLIT_DEVICES`` in ``ops/_linear_gemm.py``
should lose ``"cuda"``. ``--device cpu`` runs the same cases here (the split forced on, small shapes: a smoke
test, not a CPU measurement that decides anything).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Tuple

import torch

from rlhf_kernels.ops import _linear_gemm as gemm
from rlhf_kernels.ops._linear_common import _row_buffer

from .common import TimerConfig, environment, stamp_line, time_fn

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_WAYS = ("contiguous", "padded", "split", "aligned V")


def _operands(rows: int, v: int, h: int, dtype: torch.dtype, device: torch.device):
    """The GEMMs' operands: ``hidden``, ``weight`` (and one with ``V`` rounded up to 64), ``dlogits`` as a plain
    tensor, as a ``_row_buffer`` view and at the aligned ``V``, and the outputs each way writes."""
    g = torch.Generator(device=device).manual_seed(0)
    va = (v + 63) // 64 * 64

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    o = dict(hidden=randn(rows, h), weight=randn(v, h, scale=h**-0.5), weight_a=randn(va, h, scale=h**-0.5))
    o["dl"] = randn(rows, v, scale=1e-3)
    padded = _row_buffer(rows, v, o["hidden"])
    o["dl_padded"] = o["dl"] if padded is None else padded.copy_(o["dl"])
    o["dl_a"] = randn(rows, va, scale=1e-3)
    o["logits"] = torch.empty(rows, v, dtype=dtype, device=device)
    o["logits_padded"] = torch.empty_like(o["dl_padded"]) if padded is None else _row_buffer(rows, v, o["hidden"])
    o["logits_a"] = torch.empty(rows, va, dtype=dtype, device=device)
    o["gh"] = torch.empty(rows, h, dtype=dtype, device=device)
    o["acc"] = torch.empty(v, h, dtype=torch.float32, device=device)
    o["acc_a"] = torch.empty(va, h, dtype=torch.float32, device=device)
    return o


def _cases(o) -> List[Tuple[str, str, Callable[[], object], Callable[[], torch.Tensor]]]:
    """``(gemm, way, call, result)`` for every GEMM and way; ``result`` reads back what ``call`` wrote."""
    h, w, wa = o["hidden"], o["weight"], o["weight_a"]
    dl, dlp, dla = o["dl"], o["dl_padded"], o["dl_a"]
    out, outp, outa, gh, acc, acca = (o[k] for k in ("logits", "logits_padded", "logits_a", "gh", "acc", "acc_a"))
    return [
        ("logits", "contiguous", lambda: torch.mm(h, w.t(), out=out), lambda: out),
        ("logits", "padded", lambda: torch.mm(h, w.t(), out=outp), lambda: outp),
        ("logits", "split", lambda: gemm.logits_gemm(h, w, None, outp), lambda: outp),
        ("logits", "aligned V", lambda: torch.mm(h, wa.t(), out=outa), lambda: outa),
        ("dX", "contiguous", lambda: torch.mm(dl, w, out=gh), lambda: gh),
        ("dX", "padded", lambda: torch.mm(dlp, w, out=gh), lambda: gh),
        ("dX", "split", lambda: gemm.grad_hidden_gemm(gh, dlp, w, True), lambda: gh),
        ("dX", "aligned V", lambda: torch.mm(dla, wa, out=gh), lambda: gh),
        ("dW", "contiguous", lambda: gemm.accumulate_mm(acc, dl.t(), h, True), lambda: acc),
        ("dW", "padded", lambda: gemm.accumulate_mm(acc, dlp.t(), h, True), lambda: acc),
        ("dW", "split", lambda: gemm.grad_weight_gemm(acc, dlp, h, True), lambda: acc),
        ("dW", "aligned V", lambda: gemm.accumulate_mm(acca, dla.t(), h, True), lambda: acca),
    ]


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run(rows: int, v: int, hs: List[int], dtype: torch.dtype, device: torch.device, cfg: TimerConfig) -> List[str]:
    """The table's lines, one per GEMM and way, for each ``H``."""
    lines = ["| H | GEMM | way | ms | TFLOP/s | % of aligned V | split vs padded |", "|---|---|---|---:|---:|---:|---|"]
    for h in hs:
        o = _operands(rows, v, h, dtype, device)
        flops = 2.0 * rows * v * h
        timings, checks = {}, {}
        for name, way, call, result in _cases(o):
            timings[name, way] = time_fn([call], device, cfg).median_ms
            if way in ("padded", "split"):
                call()
                checks[name, way] = result().clone()
        for name, way, _, _ in _cases(o):
            ms = timings[name, way]
            check = ""
            if way == "split":
                check = f"{_relative_difference(checks[name, 'split'], checks[name, 'padded']):.1e}"
            lines.append(f"| {h} | {name} | {way} | {ms:.3f} | {flops / ms / 1e9:.1f} | "
                         f"{100 * timings[name, 'aligned V'] / ms:.0f}% | {check} |")
            print(lines[-1], flush=True)
        del o
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096, help="rows of the chunk (default 4096)")
    p.add_argument("--v", type=int, default=50257, help="vocabulary (default 50257, GPT-2's)")
    p.add_argument("--h", default="2048,4096", help="hidden sizes, comma-separated (default 2048,4096)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=None, help="directory for gemm_alignment.md (default: print only)")
    args = p.parse_args(argv)
    hs = [int(x) for x in args.h.split(",") if x.strip()]
    if args.rows < 1 or args.v < 1 or not hs or min(hs) < 1:
        p.error("--rows, --v and every --h must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gemm_alignment needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type not in gemm.SPLIT_DEVICES:  # the smoke test: the split forced on, so "split" splits
        gemm.SPLIT_DEVICES = gemm.SPLIT_DEVICES + (device.type,)
    cfg = TimerConfig() if device.type == "cuda" else TimerConfig(warmup_ms=1, rep_ms=5, min_reps=2, max_reps=3)
    head = (f"# gemm_alignment: rows={args.rows} V={args.v} H={args.h} {args.dtype} | "
            f"{stamp_line(environment(device))}")
    print(head, flush=True)
    lines = [head, ""] + run(args.rows, args.v, hs, _DTYPES[args.dtype], device, cfg)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gemm_alignment.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
