"""benchmarks/probe_analysis.py on made-up stamps (no GPU): the numbers probe_ppo.py reports come out right.

The stamps are built from known phase lengths on two SMs whose clock64 counters are not aligned (as on a
GPU), with 2 cycles per ns: SM 0 runs two CTAs one after the other (a 50-cycle gap between them), SM 1 two
CTAs side by side. Every expected figure below is worked out by hand from those lengths.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from benchmarks import probe_analysis as pa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# sweep 1, cluster barrier, merge, row tail, sweep 2, closing barrier (cycles)
LENGTHS = (100, 20, 10, 30, 80, 10)
LIFE = sum(LENGTHS)  # 250


def _cta(sm: int, start_cycle: int, ns_of) -> list:
    row = [0] * pa.SLOTS
    row[pa.START] = start_cycle
    slots = (pa.SWEEP1, pa.SYNCED, pa.MERGED, pa.ROW, pa.SWEEP2, pa.EXIT)
    c = start_cycle
    for slot, length in zip(slots, LENGTHS):
        c += length
        row[slot] = c
    row[pa.START_NS] = ns_of(start_cycle)
    row[pa.END_NS] = ns_of(row[pa.EXIT])
    row[pa.SM] = sm
    return row


def _stamps() -> np.ndarray:
    sm0 = lambda c: 5000 + (c - 1000) // 2  # SM 0's counter: cycle 1000 at t = 5000 ns
    sm1 = lambda c: 5000 + (c - 27777) // 2  # SM 1's counter runs 26777 cycles ahead
    return np.array([_cta(0, 1000, sm0), _cta(0, 1300, sm0), _cta(1, 27777, sm1), _cta(1, 27777, sm1)],
                    dtype=np.int64)


def test_the_slot_and_skip_numbers_match_the_kernel_header():
    with open(os.path.join(ROOT, "csrc", "cuda", "launchers.h")) as f:
        text = f.read()
    slots = {name: int(v) for name, v in re.findall(r"kProbe(\w+) = (\d+),", text)}
    assert slots["StartNs"] == pa.START_NS and slots["Start"] == pa.START and slots["Sweep1"] == pa.SWEEP1
    assert slots["Synced"] == pa.SYNCED and slots["Merged"] == pa.MERGED and slots["Row"] == pa.ROW
    assert slots["Sweep2"] == pa.SWEEP2 and slots["Exit"] == pa.EXIT and slots["EndNs"] == pa.END_NS
    assert slots["Sm"] == pa.SM and slots["Slots"] == pa.SLOTS
    assert (slots["NoExchange"], slots["NoRowTail"], slots["NoSweep2"], slots["CopySweep2"], slots["PushExchange"],
            slots["RelaxedArrive"]) == (pa.NO_EXCHANGE, pa.NO_ROW_TAIL, pa.NO_SWEEP2, pa.COPY_SWEEP2,
                                        pa.PUSH_EXCHANGE, pa.RELAXED_ARRIVE)


def test_the_clock_and_the_timer_tick_come_from_the_stamps():
    s = _stamps()
    assert pa.cycles_per_ns(s) == pytest.approx(2.0)
    assert pa.timer_tick_ns(s) == 25  # 5125 -> 5150, the smallest gap between distinct readings
    assert pa.kernel_span_us(s) == pytest.approx((5000 + 275 - 5000) / 1e3)


def test_phase_durations_and_shares():
    rows = pa.phase_table(_stamps(), 2.0)
    assert [r.name for r in rows[:-1]] == [name for name, _, _ in pa.PHASES] and rows[-1].name == "lifetime"
    for r, length in zip(rows, LENGTHS):
        assert r.median_us == pytest.approx(length / 2 / 1e3) and r.p90_us == pytest.approx(length / 2 / 1e3)
        assert r.share == pytest.approx(length / LIFE)
    assert rows[-1].median_us == pytest.approx(LIFE / 2 / 1e3) and rows[-1].share == 1.0


def test_residency_idle_memory_time_and_refill():
    s = pa.sm_summary(_stamps(), 2.0)
    assert s.sms == 2 and s.ctas_per_sm == 2.0 and s.max_resident == 2
    # SM 0: 500 cycles of CTAs over a 550-cycle span; SM 1: two CTAs over 250
    assert s.mean_resident == pytest.approx((500 / 550 + 2.0) / 2)
    # moving (sweep 1 + sweep 2): SM 0 2 x (100 + 80) of 550 cycles; SM 1 one CTA's 180 (the two overlap) of 250
    assert s.memory_idle_share == pytest.approx(((1 - 360 / 550) + (1 - 180 / 250)) / 2)
    assert s.empty_share == pytest.approx((50 / 550 + 0.0) / 2)
    assert s.refill_us == pytest.approx(50 / 2 / 1e3)  # SM 0's one exit followed by a start, 50 cycles later


def test_sweep1_against_the_other_loaders_of_its_sm():
    c = pa.sweep1_contention(_stamps(), 2.0)
    # SM 0's two CTAs run one after the other (nobody else loading), SM 1's side by side (one other loader each)
    assert [(name, n) for name, n, _ in c.groups] == [("0", 2), ("1", 2)]
    assert all(us == pytest.approx(100 / 2 / 1e3) for _, _, us in c.groups)
    assert c.fit[0] == pytest.approx(0.05) and c.fit[1] == pytest.approx(0.0, abs=1e-9)
    # SM 1's second CTA with a sweep 1 of 200 cycles: beside the other's sweep 1 (100 of them: 0.5 loaders) and its
    # sweep 2 (cycles 160-200: 0.2 storers); the other CTA saw 1.0 loaders and no storer. Exactly solved by
    # 0.05 µs + 0 per loader + 0.25 per storer (0.05 + 0.25·0.2 = 0.1 µs)
    s = _stamps()
    s[3, pa.SWEEP1:pa.EXIT + 1] += 100
    s[3, pa.END_NS] += 50
    c = pa.sweep1_contention(s, 2.0)
    assert c.fit == pytest.approx((0.05, 0.0, 0.25), abs=1e-9)
    assert [(name, n) for name, n, _ in c.groups] == [("0", 2), ("1", 2)]


def test_bad_stamps_are_named_not_misread():
    s = _stamps()
    with pytest.raises(ValueError, match=r"stamps must be \[CTAs > 0, 10\]"):
        pa.check_stamps(s[:, :9])
    unwritten = s.copy()
    unwritten[2] = 0  # a CTA that never ran its probe marks
    with pytest.raises(ValueError, match="CTA 2 wrote no stamps"):
        pa.summarize(unwritten)
    disordered = s.copy()
    disordered[1, pa.SWEEP2] = disordered[1, pa.ROW] - 1
    with pytest.raises(ValueError, match="CTA 1's stamps are out of order"):
        pa.summarize(disordered)


def test_the_report_and_the_timeline_plot(tmp_path):
    s = _stamps()
    text = pa.format_summary("cluster", pa.summarize(s))
    assert "| sweep 1 (load + statistics) | 0.05 |" in text and "| lifetime | 0.12 |" in text
    assert "2 SMs, 2.0 CTAs each" in text and "most 2" in text
    assert f"**{100 * ((1 - 360 / 550) + (1 - 180 / 250)) / 2:.1f}%**" in text
    assert "were loading meanwhile: 0: 2 CTAs, 0.05 µs; 1: 2 CTAs, 0.05 µs; least squares 0.05 µs" in text
    png = pa.plot_timeline(s, str(tmp_path / "t.png"), "test", window_us=1.0)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
