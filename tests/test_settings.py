"""``rlhf_kernels/settings.py``: every environment variable is listed, refused by name when wrong, and documented."""

from __future__ import annotations

import os
import re

import pytest

import rlhf_kernels as rk
from rlhf_kernels import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r"RLHF_KERNELS_[A-Z0-9_]+")

# A value each runtime setting must refuse (and name itself in the error).
BAD = {
    "RLHF_KERNELS_BACKEND": "gpu",
    "RLHF_KERNELS_VALIDATE": "yes",
    "RLHF_KERNELS_VIEW_GRAD": "false",
    "RLHF_KERNELS_LINEAR_CHUNK_BY": "cols",
    "RLHF_KERNELS_LINEAR_GRAD": "both",
    "RLHF_KERNELS_CUDA_PPO": "smem",
    "RLHF_KERNELS_CUDA_PREFETCH": "on",
    "RLHF_KERNELS_CUDA_CLUSTER": "3",
    "RLHF_KERNELS_CUDA_FWD_THREADS": "100",
    "RLHF_KERNELS_TRITON_BLOCK_V": "wide",
    "RLHF_KERNELS_TRITON_PPO": "one-pass",
}


def _names_in_sources():
    found = set()
    for folder in ("rlhf_kernels", "csrc", "benchmarks", "tests"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".sh")):
                    with open(os.path.join(root, name), errors="replace") as fh:
                        found |= set(NAME.findall(fh.read()))
    for name in ("setup.py", "Makefile"):
        with open(os.path.join(ROOT, name)) as fh:
            found |= set(NAME.findall(fh.read()))
    return found


def test_every_variable_the_code_reads_is_listed():
    listed = {s.name for s in settings.ALL} | set(settings.BUILD_MACROS)
    unlisted = _names_in_sources() - listed
    assert not unlisted, f"add to rlhf_kernels/settings.py: {sorted(unlisted)}"
    assert len(listed) == len(settings.ALL) + len(settings.BUILD_MACROS)  # no name twice


def test_the_readme_table_is_the_generated_one():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    block = readme[readme.index(settings.README_START) + len(settings.README_START):readme.index(settings.README_END)]
    assert block == "\n" + settings.markdown(), "run: make readme (or rlhf-kernels settings --update-readme README.md)"
    assert all(f"`{s.name}`" in block for s in settings.ALL)


def test_cli_prints_and_updates_the_table(tmp_path, capsys):
    from rlhf_kernels.cli import main

    assert main(["settings"]) == 0
    assert capsys.readouterr().out == settings.markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{settings.README_START}\nold\n{settings.README_END}\noutro\n")
    assert main(["settings", "--update-readme", str(readme)]) == 0
    assert readme.read_text() == f"intro\n{settings.README_START}\n{settings.markdown()}{settings.README_END}\noutro\n"
    assert main(["settings", "--bogus"]) == 2


def test_every_runtime_setting_has_a_bad_example():
    assert set(BAD) == {s.name for s in settings.RUNTIME}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_by_name_and_unset_is_the_default(name, monkeypatch):
    for s in settings.RUNTIME:
        monkeypatch.delenv(s.name, raising=False)
    assert all(problem is None for _, problem in settings.check().values())
    if name == "RLHF_KERNELS_TRITON_BLOCK_V":
        pytest.importorskip("triton")
    monkeypatch.setenv(name, BAD[name])
    report = settings.check()
    raw, problem = report[name]
    assert raw == BAD[name] and problem is not None and name in problem, problem
    assert all(p is None for other, (_, p) in report.items() if other != name)
    reader = next(s.reader for s in settings.RUNTIME if s.name == name)
    with pytest.raises(ValueError, match=name):
        reader()


@pytest.mark.parametrize("setting", [s for s in settings.RUNTIME if " | " in s.values], ids=lambda s: s.name)
def test_every_listed_value_is_accepted(setting, monkeypatch):
    """The values column is what users type: each value it lists must be one the setting's reader accepts (a value
    added to an op, e.g. a new RLHF_KERNELS_CUDA_PPO path, and not to the table, or the reverse, fails here)."""
    if setting.name == "RLHF_KERNELS_TRITON_BLOCK_V":
        pytest.importorskip("triton")
    for value in (v.strip() for v in setting.values.split("|")):
        monkeypatch.setenv(setting.name, value)
        setting.reader()  # raises ValueError naming the setting on a value it refuses


def test_cuda_ppo_paths_are_the_listed_values():
    from rlhf_kernels.ops.ppo import CUDA_PPO_PATHS

    listed = next(s for s in settings.RUNTIME if s.name == "RLHF_KERNELS_CUDA_PPO").values
    assert {v.strip() for v in listed.split("|")} == set(CUDA_PPO_PATHS)


def test_info_shows_each_setting_and_flags_a_bad_one(monkeypatch):
    monkeypatch.setenv("RLHF_KERNELS_CUDA_CLUSTER", "3")
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "async")
    report = rk.info(print_report=False)
    assert set(report["settings"]) == {s.name for s in settings.RUNTIME}
    assert report["settings"]["RLHF_KERNELS_VALIDATE"] == {"value": "async", "default": "1", "problem": None}
    text = rk.info.__globals__["format_report"](report)
    assert "RLHF_KERNELS_CUDA_CLUSTER      3   INVALID: RLHF_KERNELS_CUDA_CLUSTER must be one of" in text
    assert "RLHF_KERNELS_BACKEND           unset: auto" in text


def test_info_names_the_other_stacks_and_the_versions_checked(monkeypatch):
    """``rlhf-kernels info`` lists TRL, verl, OpenRLHF and Liger-Kernel: the installed version (or "not installed")
    and the one the drop-ins / benchmarks were checked against."""
    from importlib import metadata  # info.py reads versions through this module's attribute (ops._dispatch)

    real = metadata.version

    def version(pkg):
        if pkg == "verl":
            raise metadata.PackageNotFoundError(pkg)
        return "9.9" if pkg == "trl" else real(pkg)

    monkeypatch.setattr(metadata, "version", version)
    report = rk.info(print_report=False)
    assert set(report["integrations"]) == {"trl", "verl", "openrlhf", "liger-kernel"}
    assert report["integrations"]["trl"] == {"installed": "9.9", "checked": "1.16 (integrations.trl)"}
    assert report["integrations"]["verl"]["installed"] == "not installed"
    text = rk.info.__globals__["format_report"](report)
    assert "  trl            9.9; 1.16 (integrations.trl)" in text
    assert "  verl           not installed; 0.9.1 (integrations.verl)" in text


def test_view_grad_off_keeps_the_view_in_the_graph(monkeypatch):
    """The reader behind RLHF_KERNELS_VIEW_GRAD is the one the ops use: 0 turns the routing off."""
    import torch

    from rlhf_kernels.ops._checks import slice_of_base

    base = torch.randn(2, 5, 7, requires_grad=True)
    view = base[:, 1:-1]
    assert slice_of_base(view) == (base, 1)
    monkeypatch.setenv("RLHF_KERNELS_VIEW_GRAD", "0")
    assert slice_of_base(view) is None
    monkeypatch.setenv("RLHF_KERNELS_VIEW_GRAD", "off")
    with pytest.raises(ValueError, match="RLHF_KERNELS_VIEW_GRAD must be 0 or 1"):
        slice_of_base(view)
