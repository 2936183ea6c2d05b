"""benchmarks/step_profile.py on the CPU: the suite's step profiled end to end, and the report's arithmetic."""

from __future__ import annotations

import re

import pytest

from benchmarks import step_profile as sp


def test_profiles_the_suites_step_on_the_cpu(tmp_path, capsys):
    rc = sp.main(["--device", "cpu", "--ops", "ppo_loss", "--shapes", "32x100", "--dtype", "fp32",
                  "--providers", "cpu,eager,nonexistent", "--steps", "3", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    text = (tmp_path / "step_profile.md").read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ppo_loss | fwd+bwd | N=32 V=100 |")]
    # ours under validation on and off, a competitor once; on the CPU no GPU columns and no launches
    assert [r.split(" | ")[3:5] for r in rows] == [["cpu", "1"], ["cpu", "0"], ["eager", "-"]]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        step, host, kernels, idle, launches = cells[5:10]
        assert (step, kernels, idle, launches) == ("–", "–", "–", "0") and float(host) > 0
    # the fused PPO path on the CPU composes logprobs with PyTorch arithmetic: its ops show in the host table
    section = text.split("## ppo_loss fwd+bwd N=32 V=100 cpu, validate=1")[1].split("##")[0]
    assert re.search(r"\| `(aten|rlhf_kernels)[^`]*` \| \d", section), section


def test_report_gives_the_gpus_idle_time_as_the_step_less_its_kernels():
    row = {"op": "ppo_loss", "mode": "fwd+bwd", "shape": "N=4096 V=50257", "provider": "cuda", "validate": "1",
           "step_ms": 1.6, "host_ms": 1.5, "kernels_ms": 0.25, "launches": 31.0, "sync_ms": 0.4,
           "top": [("aten::where", 8.0, 80.4)]}
    text = sp.format_report([row], "stamp", 30)
    assert "| ppo_loss | fwd+bwd | N=4096 V=50257 | cuda | 1 | 1.600 | 1.500 | 0.250 | 1.350 | 31 | 0.400 |" in text
    assert "| `aten::where` | 8 | 80 |" in text


def test_refuses_what_it_cannot_profile():
    with pytest.raises(SystemExit, match="--steps"):
        sp.main(["--device", "cpu", "--steps", "2"])
    with pytest.raises(SystemExit, match="not logits-family ops"):
        sp.main(["--device", "cpu", "--ops", "gae"])
