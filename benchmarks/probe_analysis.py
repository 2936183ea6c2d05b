"""Reading the fused PPO kernel's probe stamps (csrc/cuda/ppo_probe.cuh): phases, residency, idle memory time.

The probe instantiation of ``ppo_fwd_kernel`` has thread 0 of every CTA write one row of ``SLOTS`` unsigned
64-bit values (the ``ProbeSlot`` enum of ``csrc/cuda/launchers.h``, mirrored below): ``%globaltimer`` (ns) at
the CTA's start and end, ``clock64()`` at each phase boundary, and the SM it ran on. This module turns an
array of those rows (``[CTAs, SLOTS]``, int64) into what ``benchmarks/probe_ppo.py`` reports; it needs numpy
only (matplotlib for the plot), so the tests run it on made-up stamps without a GPU.

Clocks: ``clock64()`` counts one SM's cycles and the SMs' counters are not aligned with each other, so every
per-SM quantity here (residency, overlap of phases) is computed in that SM's cycles; the global timer is
aligned across SMs but ticks coarsely on some GPUs, so it is used only for the kernel's span and to convert
cycles to time: ``cycles_per_ns`` is the median over SMs of (cycles from the SM's first CTA start to its last
CTA exit) / (the same span on the global timer), spans of ~a millisecond against ticks of at most ~1 µs.

Phases of one CTA (the slots that bound them):

* sweep 1: its slice of the row loaded (into shared memory on the on-chip paths) and its statistics reduced;
* cluster barrier: waiting for the cluster's peers to finish their sweep 1 (0 without a cluster);
* merge: thread 0 reading the peers' statistics through distributed shared memory;
* row tail: thread 0's term, outputs and sweep 2's coefficients, then a CTA barrier;
* sweep 2: the gradient of its slice written;
* closing barrier: the cluster barrier before exit (a peer may still read this CTA's statistics).

"Moving data" means being in sweep 1 or sweep 2; an SM with no resident CTA moving data draws nothing from
DRAM, which is what ``memory_idle_share`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

# ProbeSlot of csrc/cuda/launchers.h (tests/benchmarks/test_probe_analysis.py checks the two agree)
START_NS, START, SWEEP1, SYNCED, MERGED, ROW, SWEEP2, EXIT, END_NS, SM = range(10)
SLOTS = 10

# ProbeSkip of csrc/cuda/launchers.h: stages left out, then an alternative that keeps the results
NO_EXCHANGE, NO_ROW_TAIL, NO_SWEEP2, COPY_SWEEP2, PUSH_EXCHANGE, RELAXED_ARRIVE = 1, 2, 4, 8, 16, 32

PHASES: Tuple[Tuple[str, int, int], ...] = (
    ("sweep 1 (load + statistics)", START, SWEEP1),
    ("cluster barrier", SWEEP1, SYNCED),
    ("merge (peers' statistics)", SYNCED, MERGED),
    ("row tail (thread 0)", MERGED, ROW),
    ("sweep 2 (gradient out)", ROW, SWEEP2),
    ("closing barrier", SWEEP2, EXIT),
)
MOVING = ((START, SWEEP1), (ROW, SWEEP2))  # the phases that load or store the row


def check_stamps(stamps: np.ndarray) -> np.ndarray:
    """The stamps as int64 ``[CTAs, SLOTS]``, after checking every CTA wrote a full, ordered row.

    Raises ValueError naming the first bad CTA: a zero start or SM slot left unwritten (the buffer is
    zero-filled before the launch, and no clock reads 0 mid-run), or phase stamps out of order.
    """
    a = np.asarray(stamps)
    if a.ndim != 2 or a.shape[1] != SLOTS or a.shape[0] == 0:
        raise ValueError(f"stamps must be [CTAs > 0, {SLOTS}], got {list(a.shape)}")
    a = a.astype(np.int64, copy=False)
    unwritten = np.nonzero((a[:, START_NS] == 0) | (a[:, END_NS] == 0) | (a[:, START] == 0))[0]
    if unwritten.size:
        raise ValueError(f"CTA {int(unwritten[0])} wrote no stamps ({unwritten.size} of {a.shape[0]} CTAs)")
    cycles = a[:, START:EXIT + 1]
    disorder = np.nonzero((np.diff(cycles, axis=1) < 0).any(axis=1) | (a[:, END_NS] < a[:, START_NS]))[0]
    if disorder.size:
        raise ValueError(f"CTA {int(disorder[0])}'s stamps are out of order: {a[disorder[0]].tolist()}")
    return a


def cycles_per_ns(stamps: np.ndarray) -> float:
    """SM clock in cycles per ns: the median over SMs of the SM's cycle span over its global-timer span."""
    a = check_stamps(stamps)
    ratios = []
    for sm in np.unique(a[:, SM]):
        rows = a[a[:, SM] == sm]
        ns = rows[:, END_NS].max() - rows[:, START_NS].min()
        cyc = rows[:, EXIT].max() - rows[:, START].min()
        if ns > 0 and cyc > 0:
            ratios.append(cyc / ns)
    if not ratios:
        raise ValueError("no SM's span is longer than one global-timer tick: too few stamps to calibrate")
    return float(np.median(ratios))


def timer_tick_ns(stamps: np.ndarray) -> int:
    """The global timer's apparent resolution: the smallest nonzero gap between distinct start / end readings."""
    a = check_stamps(stamps)
    values = np.unique(np.concatenate([a[:, START_NS], a[:, END_NS]]))
    gaps = np.diff(values)
    return int(gaps.min()) if gaps.size else 0


@dataclass
class PhaseRow:
    name: str
    median_us: float
    p90_us: float
    mean_us: float
    share: float  # of the mean CTA lifetime


def phase_table(stamps: np.ndarray, cyc_per_ns: float) -> List[PhaseRow]:
    """Per-phase durations over all CTAs (µs), and each phase's share of the mean lifetime; the last row is
    the whole lifetime."""
    a = check_stamps(stamps)
    to_us = 1.0 / (cyc_per_ns * 1e3)
    life = (a[:, EXIT] - a[:, START]) * to_us
    rows = []
    for name, lo, hi in PHASES:
        d = (a[:, hi] - a[:, lo]) * to_us
        rows.append(PhaseRow(name, float(np.median(d)), float(np.percentile(d, 90)), float(d.mean()),
                             float(d.mean() / life.mean()) if life.mean() > 0 else 0.0))
    rows.append(PhaseRow("lifetime", float(np.median(life)), float(np.percentile(life, 90)), float(life.mean()), 1.0))
    return rows


def _union_length(intervals: Sequence[Tuple[int, int]]) -> int:
    """Total length covered by half-open intervals."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if hi <= lo:
            continue
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


@dataclass
class SmSummary:
    sms: int
    ctas_per_sm: float
    mean_resident: float  # CTAs resident on an SM, averaged over its busy span
    max_resident: int
    memory_idle_share: float  # of SM time (its span), no resident CTA in sweep 1 or sweep 2
    empty_share: float  # of SM time, no CTA resident at all
    refill_us: float  # median time from a CTA's exit to the next CTA start on that SM


def sm_summary(stamps: np.ndarray, cyc_per_ns: float) -> SmSummary:
    """Residency and idle time per SM, in the SM's own cycles, averaged over SMs (each SM's span: from its first
    CTA start to its last CTA exit)."""
    a = check_stamps(stamps)
    resident, max_res, idle, empty, refills, counts = [], 0, [], [], [], []
    for sm in np.unique(a[:, SM]):
        rows = a[a[:, SM] == sm]
        counts.append(len(rows))
        lo, hi = int(rows[:, START].min()), int(rows[:, EXIT].max())
        span = hi - lo
        if span <= 0:
            continue
        resident.append(float((rows[:, EXIT] - rows[:, START]).sum()) / span)
        # the most CTAs resident at once: +1 at each start, -1 at each exit (exits first at equal times)
        events = sorted([(int(s), 1) for s in rows[:, START]] + [(int(e), -1) for e in rows[:, EXIT]])
        live = 0
        for _, step in events:
            live += step
            max_res = max(max_res, live)
        moving = [(int(r[p]), int(r[q])) for r in rows for p, q in MOVING]
        idle.append(1.0 - _union_length(moving) / span)
        empty.append(1.0 - _union_length([(int(r[START]), int(r[EXIT])) for r in rows]) / span)
        starts = np.sort(rows[:, START])
        for e in rows[:, EXIT]:
            k = np.searchsorted(starts, e, side="left")
            if k < len(starts):
                refills.append(int(starts[k] - e))
    if not resident:
        raise ValueError("no SM ran for more than one cycle")
    to_us = 1.0 / (cyc_per_ns * 1e3)
    return SmSummary(len(counts), float(np.mean(counts)), float(np.mean(resident)), max_res, float(np.mean(idle)),
                     float(np.mean(empty)), float(np.median(refills)) * to_us if refills else float("nan"))


@dataclass
class Contention:
    groups: List[Tuple[str, int, float]]  # (other CTAs of its SM loading meanwhile: "0" / "1" / "2+", CTAs, median µs)
    fit: Tuple[float, float, float]  # sweep 1 µs ~ intercept + a·(other loaders) + b·(other storers), least squares


def sweep1_contention(stamps: np.ndarray, cyc_per_ns: float) -> Contention:
    """How a CTA's sweep 1 lasts against what the other CTAs of its SM do meanwhile: for each CTA, the time-averaged
    number of others in sweep 1 (loading) and in sweep 2 (storing) over its own sweep 1. A sweep 1 as long alone as
    beside others is the CTA's own time (its bytes in flight, its instructions); one that grows with the others is
    the SM's share of the memory system. (H200 run 6: 8.8 µs alone, 9.1 beside one loader.)"""
    a = check_stamps(stamps)
    to_us = 1.0 / (cyc_per_ns * 1e3)
    samples = []
    for sm in np.unique(a[:, SM]):
        rows = a[a[:, SM] == sm]
        for i in range(len(rows)):
            lo, hi = rows[i, START], rows[i, SWEEP1]
            if hi <= lo:
                continue
            loading = np.clip(np.minimum(hi, rows[:, SWEEP1]) - np.maximum(lo, rows[:, START]), 0, None)
            loading[i] = 0
            storing = np.clip(np.minimum(hi, rows[:, SWEEP2]) - np.maximum(lo, rows[:, ROW]), 0, None)
            storing[i] = 0
            samples.append(((hi - lo) * to_us, loading.sum() / (hi - lo), storing.sum() / (hi - lo)))
    if not samples:
        raise ValueError("no CTA's sweep 1 lasted a cycle")
    x = np.array(samples)
    groups = []
    for name, low, high in (("0", -1.0, 0.5), ("1", 0.5, 1.5), ("2+", 1.5, np.inf)):
        sel = (x[:, 1] >= low) & (x[:, 1] < high)
        if sel.any():
            groups.append((name, int(sel.sum()), float(np.median(x[sel, 0]))))
    coef = np.linalg.lstsq(np.c_[np.ones(len(x)), x[:, 1], x[:, 2]], x[:, 0], rcond=None)[0]
    return Contention(groups, (float(coef[0]), float(coef[1]), float(coef[2])))


def kernel_span_us(stamps: np.ndarray) -> float:
    """First CTA start to last CTA end on the global timer (µs)."""
    a = check_stamps(stamps)
    return float(a[:, END_NS].max() - a[:, START_NS].min()) / 1e3


def summarize(stamps: np.ndarray) -> Dict[str, object]:
    """Everything probe_ppo.py prints about one probed launch."""
    cyc = cycles_per_ns(stamps)
    return {"cycles_per_ns": cyc, "timer_tick_ns": timer_tick_ns(stamps), "span_us": kernel_span_us(stamps),
            "phases": phase_table(stamps, cyc), "sms": sm_summary(stamps, cyc),
            "contention": sweep1_contention(stamps, cyc)}


def format_summary(title: str, summary: Dict[str, object]) -> str:
    """Markdown for one probed launch: the phase table, then the per-SM figures."""
    s: SmSummary = summary["sms"]  # type: ignore[assignment]
    lines = [f"### {title}", "",
             (f"Kernel span {summary['span_us']:.1f} µs on the global timer (tick {summary['timer_tick_ns']} ns); "
              f"SM clock {summary['cycles_per_ns']:.3f} GHz from the stamps."), "",
             "| phase | median µs | p90 µs | mean µs | share of lifetime |", "|---|---|---|---|---|"]
    for r in summary["phases"]:  # type: ignore[union-attr]
        lines.append(f"| {r.name} | {r.median_us:.2f} | {r.p90_us:.2f} | {r.mean_us:.2f} | {100 * r.share:.1f}% |")
    lines += ["", (f"- {s.sms} SMs, {s.ctas_per_sm:.1f} CTAs each; resident per SM: mean {s.mean_resident:.2f}, "
                   f"most {s.max_resident}"),
              (f"- SM time with no resident CTA loading or storing (sweep 1 / sweep 2): "
               f"**{100 * s.memory_idle_share:.1f}%**; with no CTA at all: {100 * s.empty_share:.1f}%"),
              f"- a freed slot is refilled after {s.refill_us:.2f} µs (median, exit to next start on that SM)"]
    c: Contention = summary["contention"]  # type: ignore[assignment]
    groups = "; ".join(f"{name}: {n} CTAs, {us:.2f} µs" for name, n, us in c.groups)
    lines += [(f"- sweep 1 (median) by how many other CTAs of its SM were loading meanwhile: {groups}; least squares "
               f"{c.fit[0]:.2f} µs + {c.fit[1]:.2f} per other loader + {c.fit[2]:.2f} per other storer"), ""]
    return "\n".join(lines)


def _lanes(rows: np.ndarray) -> List[int]:
    """Greedy interval partitioning of one SM's CTAs into lanes (rows sorted by start)."""
    ends: List[int] = []
    lanes = []
    for r in rows:
        for i, e in enumerate(ends):
            if e <= r[START]:
                ends[i] = int(r[EXIT])
                lanes.append(i)
                break
        else:
            ends.append(int(r[EXIT]))
            lanes.append(len(ends) - 1)
    return lanes


def plot_timeline(stamps: np.ndarray, path: str, title: str, sms: int = 6, window_us: float = 120.0) -> str:
    """A PNG of the first ``window_us`` of ``sms`` SMs: one bar per CTA per lane, colored by phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = check_stamps(stamps)
    cyc = cycles_per_ns(a)
    colors = ["#4c72b0", "#c44e52", "#dd8452", "#8172b3", "#55a868", "#937860"]
    chosen = np.unique(a[:, SM])[:sms]
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.55 * len(chosen) * 3))
    y, ticks, labels = 0.0, [], []
    for sm in chosen:
        rows = a[a[:, SM] == sm]
        rows = rows[np.argsort(rows[:, START])]
        origin = rows[:, START].min()
        lanes = _lanes(rows)
        for r, lane in zip(rows, lanes):
            for k, (_, lo, hi) in enumerate(PHASES):
                x0 = (r[lo] - origin) / cyc / 1e3
                if x0 > window_us:
                    break
                ax.broken_barh([(x0, (r[hi] - r[lo]) / cyc / 1e3)], (y + lane * 0.9, 0.8), color=colors[k])
        ticks.append(y + 0.4 * max(lanes) + 0.4)
        labels.append(f"SM {int(sm)}")
        y += (max(lanes) + 1) * 0.9 + 0.6
    ax.set_xlim(0, window_us)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("µs since the SM's first CTA started")
    ax.set_title(title)
    ax.legend(handles=[matplotlib.patches.Patch(color=c, label=n) for c, (n, _, _) in zip(colors, PHASES)],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
