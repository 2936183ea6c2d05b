"""benchmarks/gemm_alignment.py on the CPU (its smoke test): every GEMM timed four ways, the split checked."""

from __future__ import annotations

import pytest

from benchmarks import gemm_alignment as ga
from rlhf_kernels.ops import _linear_gemm as gemm


def test_cpu_smoke_run_writes_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gemm, "SPLIT_DEVICES", gemm.SPLIT_DEVICES)  # main() widens it for the CPU; restored after
    assert ga.main(["--device", "cpu", "--rows", "24", "--v", "301", "--h", "16,40", "--dtype", "bf16",
                    "--out", str(tmp_path)]) == 0
    rows = [line for line in (tmp_path / "gemm_alignment.md").read_text().splitlines() if line.startswith("| 16")
            or line.startswith("| 40")]
    assert len(rows) == 2 * 3 * len(ga._WAYS), rows
    split = [line.split("|") for line in rows if "| split |" in line]
    assert len(split) == 6 and all(float(cells[7]) < 2e-2 for cells in split), split  # bf16: within a few ulps
    assert "# gemm_alignment: rows=24 V=301" in capsys.readouterr().out


def test_bad_arguments_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        ga.main(["--device", "cpu", "--h", "0"])
    assert "--h" in capsys.readouterr().err
