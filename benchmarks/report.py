"""Writes a run's results: CSV (merged with earlier runs), markdown tables and PNG plots.

Everything here is generated from the rows of ``results.csv``; no number is
typed by hand (DESIGN.md §6).
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections import OrderedDict, defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from . import common

NUMERIC = {"N": int, "V": int, "H": int, "reps": int}
FLOATS = ("ms", "ms_p20", "ms_p80", "gbps", "pct_bw", "tflops", "pct_mm", "peak_mb", "copy_gbps", "mm_tflops")
OURS = ("triton", "cuda", "cpu")
COMPETITORS = ("eager", "compile", "chunked", "liger")
PROVIDERS = ("eager", "compile", "chunked", "liger", "triton", "cuda", "cpu")
OP_ORDER = ("logprobs", "logprobs+ent", "kl_divergence", "ppo_loss", "linear_logprobs", "linear_logprobs+ent", "gae")
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")


def _typed(row: Dict[str, str]) -> Dict[str, object]:
    out: Dict[str, object] = dict(row)
    for k, f in NUMERIC.items():
        try:
            out[k] = f(row[k])
        except (KeyError, ValueError):
            out[k] = 0
    for k in FLOATS:
        try:
            out[k] = float(row[k])
        except (KeyError, ValueError):
            out[k] = float("nan")
    return out


def read_csv(path: str) -> List[Dict[str, object]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return [_typed(r) for r in csv.DictReader(fh)]


def emit(text: str, out: Optional[str]) -> None:
    """A report's text on stdout, and also in the file ``out`` when given (the ``--out`` of the static tools)."""
    sys.stdout.write(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text)


def _sort_key(r: Dict[str, object]):
    op = OP_ORDER.index(r["op"]) if r["op"] in OP_ORDER else len(OP_ORDER)
    mode = MODE_ORDER.index(r["mode"]) if r["mode"] in MODE_ORDER else 9
    prov = PROVIDERS.index(r["provider"]) if r["provider"] in PROVIDERS else 99
    return (op, str(r["op"]), mode, str(r["dtype"]), int(r["N"]), int(r["V"]), int(r["H"]), str(r["shape"]), prov)


def merge(old: List[Dict[str, object]], new: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """New rows replace old rows with the same op / mode / dtype / shape / provider."""
    new_keys = {common.key_of(r) for r in new}
    kept = [r for r in old if common.key_of(r) not in new_keys]
    return sorted(kept + list(new), key=_sort_key)


def write_csv(path: str, rows: Sequence[Dict[str, object]]) -> None:
    fields = common.Row.fields()
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _fmt_csv(r.get(k, "")) for k in fields})


def _fmt_csv(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


# --------------------------------------------------------------------------- markdown


def _f(v: object, digits: int = 1) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _ms(r) -> str:
    if r["status"] != "ok":
        return str(r["status"]).upper()
    d = 3 if r["ms"] < 10 else 1
    return f"{r['ms']:.{d}f} ({r['ms_p20']:.{d}f}–{r['ms_p80']:.{d}f})"


def groups(rows: Iterable[Dict[str, object]]):
    """``{(op, mode): {shape_key: {provider: row}}}`` in display order."""
    out: "OrderedDict" = OrderedDict()
    for r in sorted(rows, key=_sort_key):
        out.setdefault((r["op"], r["mode"]), OrderedDict()).setdefault(common.shape_key(r), OrderedDict())[r["provider"]] = r
    return out


def _ratio(a: Optional[Dict], b: Optional[Dict]) -> str:
    """``b.ms / a.ms`` when both ran in the same run (> 1: ``a`` is faster)."""
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or a["run_id"] != b["run_id"]:
        return "–"
    return f"{b['ms'] / a['ms']:.2f}×"


def stamp(meta: Dict) -> str:
    return common.stamp_line(meta["env"])


def results_markdown(rows: List[Dict[str, object]], meta: Dict) -> str:
    env = meta["env"]
    lines = [
        f"# Benchmark results: {env['device']}",
        "",
        f"{stamp(meta)} | liger-kernel {env.get('liger', '-')}",
        "",
        _roofs(rows),
        "",
        "Method (DESIGN.md §6): median of per-call timings after warm-up (in brackets p20–p80), CUDA events with the L2 "
        "flushed before each call and input sets rotated on GPU, `time.perf_counter` on CPU. GB/s counts the bytes that "
        "must move (logits read once per pass, gradient written once); % BW is against the copy bandwidth measured in "
        "the same run (best of >= 10 copies; the matmul roof likewise). Peak MB: extra memory of one call beyond its inputs (GPU: `max_memory_allocated` delta; CPU: "
        "peak-RSS delta). `×p` = time of provider p / time of this row, same run (> 1: this row is faster). "
        "Generated by `python -m benchmarks.run`; do not edit.",
        "",
    ]
    skipped: Dict[str, Dict[str, str]] = defaultdict(dict)
    for (op, mode), shapes in groups(rows).items():
        present = [p for p in PROVIDERS if any(p in g and g[p]["status"] != "skipped" for g in shapes.values())]
        for g in shapes.values():
            for p, r in g.items():
                if r["status"] == "skipped":
                    skipped[op][p] = r["note"]
        if not present:
            continue
        flops = any(not math.isnan(r["tflops"]) for g in shapes.values() for r in g.values())
        lines.append(f"## {op} — {mode}")
        lines.append("")
        head = ["dtype", "shape", "provider", "ms (p20–p80)", "GB/s", "% BW"]
        if flops:
            head += ["TFLOP/s", "% matmul"]
        head += ["peak MB"] + [f"×{p}" for p in present]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        for key, g in shapes.items():
            for p in present:
                r = g.get(p)
                if r is None or r["status"] == "skipped":
                    continue
                cells = [str(r["dtype"]), str(r["shape"]), f"**{p}**" if p in OURS else p, _ms(r), _f(r["gbps"]), _f(r["pct_bw"])]
                if flops:
                    cells += [_f(r["tflops"]), _f(r["pct_mm"])]
                cells += [_f(r["peak_mb"], 0)] + [("" if q == p else _ratio(r, g.get(q))) for q in present]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if skipped:
        lines += ["## Skipped providers", ""]
        for op in sorted(skipped, key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else 99):
            for p, note in skipped[op].items():
                lines.append(f"- {op} / {p}: {note}")
        lines.append("")
    failed = [r for r in rows if r["status"] in ("oom", "error")]
    if failed:
        lines += ["## Failures", ""]
        for r in failed:
            lines.append(f"- {r['op']} {r['mode']} {r['dtype']} {r['shape']} / {r['provider']}: {r['status']} {r['note']}")
        lines.append("")
    return "\n".join(lines)


def _roofs(rows) -> str:
    copy = sorted({round(float(r["copy_gbps"]), 1) for r in rows if not math.isnan(float(r["copy_gbps"]))})
    mm = sorted({(r["dtype"], round(float(r["mm_tflops"]), 2)) for r in rows if not math.isnan(float(r["mm_tflops"]))})
    text = "Copy bandwidth measured in the run(s): " + (", ".join(f"{c} GB/s" for c in copy) or "–")
    if mm:
        text += "; dense matmul: " + ", ".join(f"{d} {t} TFLOP/s" for d, t in mm)
    return text + "."


def headline(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per op / mode / dtype: the largest shape, best of ours vs each competitor."""
    out = []
    for (op, mode), shapes in groups(rows).items():
        by_dtype: Dict[str, tuple] = {}
        for key, g in shapes.items():
            any_row = next(iter(g.values()))
            size = int(any_row["N"]) * max(1, int(any_row["V"])) * max(1, int(any_row["H"]))
            ours = [g[p] for p in OURS if p in g and g[p]["status"] == "ok"]
            if not any(r["status"] == "ok" for r in g.values()):
                continue
            d = str(any_row["dtype"])
            if d not in by_dtype or size > by_dtype[d][0]:
                by_dtype[d] = (size, g, min(ours, key=lambda r: r["ms"]) if ours else None)
        for d, (_, g, best) in by_dtype.items():
            shape = next(iter(g.values()))["shape"]
            out.append({"op": op, "mode": mode, "dtype": d, "shape": shape, "best": best, "g": g})
    return out


def summary_markdown(rows: List[Dict[str, object]], meta: Dict) -> str:
    lines = [
        f"{stamp(meta)}. {_roofs(rows)}",
        "",
        "Largest shape measured per op; *ours* is the fastest of this package's backends; `×p` is how many times faster "
        "ours is than provider p in the same run; % BW is ours against the copy bandwidth (% matmul for the fused-linear op).",
        "",
        "| op | mode | dtype | shape | ours | ms | % BW | peak MB | " + " | ".join(f"{p} ms" for p in COMPETITORS)
        + " | " + " | ".join(f"×{p}" for p in COMPETITORS) + " |",
        "|" + "|".join("---" for _ in range(8 + 2 * len(COMPETITORS))) + "|",
    ]
    for h in headline(rows):
        b, g = h["best"], h["g"]
        if b is None:
            b = {"provider": "– (no backend)", "ms": float("nan"), "pct_mm": float("nan"), "pct_bw": float("nan"),
                 "peak_mb": float("nan"), "status": "none", "run_id": ""}  # fmt: skip
        pct = b["pct_mm"] if not math.isnan(b["pct_mm"]) else b["pct_bw"]
        comp_ms = [(_f(g[p]["ms"], 2) if p in g and g[p]["status"] == "ok" else (g[p]["status"].upper() if p in g and g[p]["status"] != "skipped" else "–")) for p in COMPETITORS]  # noqa: E501
        ratios = [_ratio(b, g.get(p)) for p in COMPETITORS]
        lines.append(
            f"| {h['op']} | {h['mode']} | {h['dtype']} | {h['shape']} | {b['provider']} | {_f(b['ms'], 2)} | {_f(pct)} | "
            f"{_f(b['peak_mb'], 0)} | " + " | ".join(comp_ms) + " | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

COLORS = {"eager": "#7f7f7f", "compile": "#9467bd", "chunked": "#8c564b", "liger": "#ff7f0e",
          "triton": "#1f77b4", "cuda": "#2ca02c", "cpu": "#d62728"}  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_op(path: str, op: str, rows: List[Dict[str, object]], meta: Dict) -> Optional[str]:
    """Rows of panels (ms, GB/s or TFLOP/s, peak MB) against V; one column per dtype x mode, largest N (and H)."""
    rows = [r for r in rows if r["op"] == op and r["status"] == "ok"]
    if not rows:
        return None
    plt = _plt()
    scan = all(int(r["V"]) == 0 for r in rows)
    combos = sorted({(r["dtype"], r["mode"]) for r in rows}, key=lambda c: (c[0], MODE_ORDER.index(c[1])))
    flops = any(not math.isnan(r["tflops"]) for r in rows)
    fig, axes = plt.subplots(3, len(combos), figsize=(4.6 * len(combos), 10), squeeze=False)
    for col, (dtype, mode) in enumerate(combos):
        sel = [r for r in rows if r["dtype"] == dtype and r["mode"] == mode]
        if scan:
            xkey, fixed = "N", ""
            sub = sel
        else:
            n_max = max(int(r["N"]) for r in sel)
            h_max = max(int(r["H"]) for r in sel)
            sub = [r for r in sel if int(r["N"]) == n_max and int(r["H"]) == h_max]
            xkey, fixed = "V", f"N={n_max}" + (f" H={h_max}" if h_max else "")
        for p in PROVIDERS:
            pts = sorted((int(r[xkey]), r) for r in sub if r["provider"] == p)
            if not pts:
                continue
            xs = [x for x, _ in pts]
            style = dict(marker="o", color=COLORS.get(p), label=p, linewidth=2.2 if p in OURS else 1.3)
            axes[0][col].plot(xs, [r["ms"] for _, r in pts], **style)
            axes[1][col].plot(xs, [(r["tflops"] if flops else r["gbps"]) for _, r in pts], **style)
            axes[2][col].plot(xs, [r["peak_mb"] for _, r in pts], **style)
        roof = [r["mm_tflops"] if flops else r["copy_gbps"] for r in sub]
        roof = [v for v in roof if not math.isnan(v)]
        if roof:
            axes[1][col].axhline(sorted(roof)[len(roof) // 2], color="k", linestyle="--",
                                 label="matmul peak (measured)" if flops else "copy bandwidth (measured)")  # fmt: skip
        axes[0][col].set_title(f"{op} {mode} {dtype} {fixed}", fontsize=9)
        axes[0][col].set_ylabel("ms (median)")
        axes[0][col].set_yscale("log")
        axes[1][col].set_ylabel("TFLOP/s" if flops else "effective GB/s")
        axes[2][col].set_ylabel("peak extra MB")
        for ax in (axes[0][col], axes[1][col], axes[2][col]):
            ax.set_xlabel("tokens N = B·T" if scan else "vocab size V")
            ax.grid(True, alpha=0.3)
            ticks = sorted({int(r[xkey]) for r in sub})
            if len(ticks) > 1:
                ax.set_xscale("log")
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
        axes[1][col].legend(fontsize=7)
    fig.suptitle(f"{op}: {stamp(meta)}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_summary(path: str, rows: List[Dict[str, object]], meta: Dict) -> Optional[str]:
    """% of the bandwidth limit (matmul limit for fused-linear) per op at its largest shape, one bar per provider."""
    heads = [h for h in headline(rows) if h["mode"] in ("fwd+bwd", "fwd")]
    # One bar group per op: fwd+bwd when measured, first dtype.
    chosen: "OrderedDict[str, dict]" = OrderedDict()
    for h in heads:
        cur = chosen.get(h["op"])
        if cur is None or (cur["mode"] != "fwd+bwd" and h["mode"] == "fwd+bwd"):
            chosen[h["op"]] = h
    if not chosen:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(chosen) + 2), 4.2))
    provs = [p for p in PROVIDERS if any(p in h["g"] and h["g"][p]["status"] == "ok" for h in chosen.values())]
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        vals = []
        for h in chosen.values():
            r = h["g"].get(p)
            if r is None or r["status"] != "ok":
                vals.append(0.0)
            else:
                vals.append(r["pct_mm"] if not math.isnan(r["pct_mm"]) else r["pct_bw"])
        xs = [k + (i - (len(provs) - 1) / 2) * width for k in range(len(chosen))]
        ax.bar(xs, vals, width, label=p, color=COLORS.get(p))
    ax.axhline(100.0, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(chosen)))
    ax.set_xticklabels([f"{op}\n{h['mode']} {h['dtype']}\n{h['shape']}" for op, h in chosen.items()], fontsize=7)
    ax.set_ylabel("% of copy bandwidth (fused-linear: % of matmul)")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(stamp(meta), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- entry points


def write_all(out_dir: str, new_rows: Sequence[common.Row], meta: Dict, *, fresh: bool, plots: bool,
              log: Callable[[str], None] = print) -> List[str]:  # fmt: skip
    csv_path = os.path.join(out_dir, "results.csv")
    new = [_typed({k: ("" if isinstance(v, float) and math.isnan(v) else str(v)) for k, v in r.as_dict().items()}) for r in new_rows]
    rows = merge([] if fresh else read_csv(csv_path), new)
    write_csv(csv_path, rows)
    written = [csv_path]
    meta_path = os.path.join(out_dir, "meta.json")
    runs = {} if fresh else common.read_json(meta_path).get("runs", {})
    live = {str(r["run_id"]) for r in rows}
    runs = {k: v for k, v in runs.items() if k in live}
    runs[meta["run_id"]] = {k: v for k, v in meta.items() if k != "runs"}
    full_meta = dict(meta, runs=runs)
    common.write_json(meta_path, full_meta)
    written.append(meta_path)
    for name, text in (("results.md", results_markdown(rows, meta)), ("summary.md", summary_markdown(rows, meta))):
        path = os.path.join(out_dir, name)
        with open(path, "w") as fh:
            fh.write(text)
        written.append(path)
    if plots:
        try:
            for op in sorted({str(r["op"]) for r in rows}):
                p = plot_op(os.path.join(out_dir, f"{op.replace('+', '_')}.png"), op, rows, meta)
                if p:
                    written.append(p)
            p = plot_summary(os.path.join(out_dir, "summary.png"), rows, meta)
            if p:
                written.append(p)
        except ImportError as exc:
            log(f"plots skipped: matplotlib missing ({exc})")
    return written


def append_log(out_dir: str, lines: List[str], *, fresh: bool) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "run.log")
    with open(path, "w" if fresh else "a") as fh:
        fh.write("\n".join(lines) + "\n\n")
    return path
