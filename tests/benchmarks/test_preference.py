"""benchmarks/preference.py: the backend order the committed results suggest per dispatch op."""

from __future__ import annotations

import csv
import os

import pytest

from benchmarks import preference
from benchmarks.common import Row


def _write(path, cells):
    """cells: (op, mode, provider, ms[, commit]) rows of one shape."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=Row.fields())
        writer.writeheader()
        for op, mode, provider, ms, *rest in cells:
            writer.writerow(dict(run_id="r", op=op, mode=mode, dtype="bfloat16", N=8, V=16, H=0, shape="N=8 V=16",
                                 provider=provider, status="ok", ms=ms, commit=rest[0] if rest else "c"))


def test_dispatch_ops():
    assert preference.dispatch_op("logprobs+ent") == "logprobs"
    assert preference.dispatch_op("linear_cross_entropy+vocab") == "linear_logprobs"
    assert preference.dispatch_op("linear_ppo_loss") == "linear_logprobs"
    assert preference.dispatch_op("kl_divergence") == "kl_divergence"


def test_training_step_decides_and_commits_pair(tmp_path):
    _write(tmp_path / "results.csv", [
        ("ppo_loss", "fwd", "cuda", 0.8), ("ppo_loss", "fwd", "triton", 1.0),          # cuda wins the forward
        ("ppo_loss", "fwd+bwd", "cuda", 3.5), ("ppo_loss", "fwd+bwd", "triton", 2.9),  # but not the step
        ("logprobs+ent", "fwd", "cuda", 0.5), ("logprobs+ent", "fwd", "triton", 1.0),  # forward only: it decides
        ("gae", "fwd", "cuda", 0.1), ("gae", "fwd", "triton", 0.2, "other-commit"),    # different commits: no pair
        ("kl_divergence", "fwd", "cuda", 1.0), ("kl_divergence", "fwd", "eager", 0.1), # no triton row
    ])
    ratios = preference.paired_ratios(preference.read_csv(str(tmp_path / "results.csv")))
    assert set(ratios) == {"ppo_loss", "logprobs"}
    assert preference.suggestion(ratios["ppo_loss"]) == ("triton", "cuda")
    assert preference.suggestion(ratios["logprobs"]) == ("cuda", "triton")
    text = preference.report(str(tmp_path))
    assert "| ppo_loss | fwd+bwd | 1 | 0 | 1.207 | triton > cuda |" in text


def test_cli_needs_a_results_file(tmp_path, capsys):
    assert preference.main([str(tmp_path)]) == 2
    _write(tmp_path / "results.csv", [("logprobs", "fwd", "cuda", 1.0), ("logprobs", "fwd", "triton", 2.0)])
    out = tmp_path / "p.md"
    assert preference.main([str(tmp_path), "--out", str(out)]) == 0
    assert "cuda > triton" in out.read_text()


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("folder", ["nvidia-h200"])
def test_committed_results_read(folder):
    """The committed H200 folder parses and pairs its cells (logprobs and KL were measured on both backends)."""
    ratios = preference.paired_ratios(preference.read_csv(os.path.join(ROOT, "benchmarks", "results", folder,
                                                                       "results.csv")))
    assert len(ratios["logprobs"]["fwd"]) >= 36 and len(ratios["kl_divergence"]["fwd+bwd"]) >= 7
