"""``benchmarks/merge_gpu_results.py``: several device calls' archives merged into the committed results."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest

from benchmarks import common, merge_gpu_results, report

DEVICE = "nvidia-test-gpu"


def _row(run_id, op, provider, ms):
    return common.Row(run_id=run_id, op=op, mode="fwd", dtype="bfloat16", N=8, V=16, H=0, shape="N=8 V=16",
                      provider=provider, status="ok", ms=ms, gbps=1.0, pct_bw=1.0, device="Test GPU")


def _results(folder, runs, trainer=None):
    """A device folder as gpu_suite leaves it: ``runs`` = {run_id: [(op, provider, ms), ...]}, in order."""
    path = os.path.join(folder, "results", DEVICE)
    os.makedirs(path, exist_ok=True)
    for run_id, cells in runs.items():
        env = {"device": "Test GPU", "torch": "2.x", "triton": "3.x", "cuda": "13.0", "commit": run_id, "date": "d"}
        meta = {"run_id": run_id, "env": env}
        report.write_all(path, [_row(run_id, *c) for c in cells], meta, fresh=False, plots=False, log=lambda s: None)
        report.append_log(path, [f"{merge_gpu_results.RUN_HEADER}{run_id}", f"cells of {run_id}"], fresh=False)
    if trainer is not None:
        with open(os.path.join(path, "trainer.csv"), "w") as fh:
            fh.write(trainer)
    os.makedirs(os.path.join(folder, "results", "cpu-other"), exist_ok=True)  # CPU folders are left alone
    return folder


def _tgz(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        for name in os.listdir(folder):
            tar.add(os.path.join(folder, name), arcname=name)
    return path


@pytest.fixture
def committed(tmp_path):
    root = _results(str(tmp_path / "repo"), {"runA": [("logprobs", "triton", 1.0), ("logprobs", "cuda", 0.9)]},
                    trainer="stage,ms\nsft,1\n")
    return os.path.join(root, "results")


def test_calls_merge_into_the_committed_results(committed, tmp_path):
    first = _results(str(tmp_path / "call1"), {"runA": [("logprobs", "triton", 1.0), ("logprobs", "cuda", 0.9)],
                                               "runB": [("logprobs", "cuda", 0.7), ("kl_divergence", "cuda", 2.0)]})
    for name in ("gpu_suite.log", "pytest_gpu.log"):
        with open(os.path.join(first, name), "w") as fh:
            fh.write(f"{name} of call 1\n")
    second = _results(str(tmp_path / "call2"), {"runA": [("logprobs", "triton", 1.0), ("logprobs", "cuda", 0.9)],
                                                "runC": [("ppo_loss", "triton", 3.0)]}, trainer="stage,ms\nsft,2\n")
    with open(os.path.join(second, "gpu_suite.log"), "w") as fh:
        fh.write("gpu_suite.log of call 2\n")
    archive = _tgz(first, str(tmp_path / "g.tgz"))

    added = merge_gpu_results.merge([archive, second], "run9", committed, log=lambda s: None)

    assert added == {DEVICE: {"runB", "runC"}}
    folder = os.path.join(committed, DEVICE)
    merged = report.read_csv(os.path.join(folder, "results.csv"))
    rows = {(r["op"], r["provider"]): (r["run_id"], r["ms"]) for r in merged}
    assert rows == {("logprobs", "triton"): ("runA", 1.0), ("logprobs", "cuda"): ("runB", 0.7),
                    ("kl_divergence", "cuda"): ("runB", 2.0), ("ppo_loss", "triton"): ("runC", 3.0)}
    with open(os.path.join(folder, "meta.json")) as fh:
        meta = json.load(fh)
    assert set(meta["runs"]) == {"runA", "runB", "runC"} and meta["run_id"] == "runC"
    with open(os.path.join(folder, "run.log")) as fh:
        log = fh.read()
    assert [log.count(f"cells of {r}") for r in ("runA", "runB", "runC")] == [1, 1, 1]
    with open(os.path.join(folder, "results.md")) as fh:
        assert "ppo_loss" in fh.read()
    assert sorted(os.listdir(os.path.join(folder, "logs", "run9"))) == [
        "call2_gpu_suite.log", "gpu_suite.log", "pytest_gpu.log"]
    with open(os.path.join(folder, "logs", "run9", "call2_gpu_suite.log")) as fh:
        assert fh.read() == "gpu_suite.log of call 2\n"
    with open(os.path.join(folder, "trainer.csv")) as fh:
        assert fh.read() == "stage,ms\nsft,2\n"  # the call that re-ran the trainer
    assert not os.path.exists(os.path.join(committed, "cpu-other", "results.csv"))


def test_merging_the_same_archive_twice_adds_nothing(committed, tmp_path):
    call = _results(str(tmp_path / "call"), {"runB": [("logprobs", "cuda", 0.7)]})
    assert merge_gpu_results.merge([call], "run9", committed, log=lambda s: None) == {DEVICE: {"runB"}}
    before = open(os.path.join(committed, DEVICE, "results.csv")).read()
    assert merge_gpu_results.merge([call], "run9", committed, device=DEVICE, log=lambda s: None) == {}
    assert open(os.path.join(committed, DEVICE, "results.csv")).read() == before


def test_a_call_without_rows_needs_the_device_for_its_logs(committed, tmp_path):
    call = _results(str(tmp_path / "call"), {"runA": [("logprobs", "triton", 1.0)]})
    with open(os.path.join(call, "ncu_summary.md"), "w") as fh:
        fh.write("| kernel |\n")
    console = tmp_path / "console2.log"
    console.write_text("tail of the device call\n")
    with pytest.raises(ValueError, match="--device"):
        merge_gpu_results.merge([call], "run9", committed, log=lambda s: None)
    with pytest.raises(ValueError, match="--extra: no such file"):
        merge_gpu_results.merge([call], "run9", committed, device=DEVICE, extra=[str(tmp_path / "nope.log")])
    merge_gpu_results.merge([call], "run9", committed, device=DEVICE, extra=[str(console)], log=lambda s: None)
    assert sorted(os.listdir(os.path.join(committed, DEVICE, "logs", "run9"))) == ["console2.log", "ncu_summary.md"]


def test_bad_sources_are_refused_by_name(committed, tmp_path):
    not_an_archive = tmp_path / "notes.txt"
    not_an_archive.write_text("hello")
    assert merge_gpu_results.main([str(not_an_archive), "--run", "r", "--results", committed]) == 2
    logs_only = tmp_path / "logs_only"  # a call that ran only tests or profiles: no results/, its logs kept
    logs_only.mkdir()
    (logs_only / "tune_triton.log").write_text("sweep\n")
    with pytest.raises(ValueError, match="--device"):
        merge_gpu_results.merge([str(logs_only)], "r", committed, log=lambda s: None)
    assert merge_gpu_results.merge([str(logs_only)], "r", committed, device=DEVICE, log=lambda s: None) == {}
    assert os.listdir(os.path.join(committed, DEVICE, "logs", "r")) == ["tune_triton.log"]
    evil = tmp_path / "evil"
    (evil / "results").mkdir(parents=True)
    shutil.copyfile(str(not_an_archive), str(evil / "x.txt"))
    with tarfile.open(str(tmp_path / "evil.tgz"), "w:gz") as tar:
        tar.add(str(evil / "x.txt"), arcname="../outside.txt")
        tar.add(str(evil / "results"), arcname="results")
    with pytest.raises(ValueError, match="outside the extraction folder"):
        merge_gpu_results.merge([str(tmp_path / "evil.tgz")], "r", committed, log=lambda s: None)


@pytest.mark.parametrize("order", ["as run", "reversed"])
def test_a_later_call_does_not_bring_back_a_replaced_run(tmp_path, order):
    """Each archive carries the committed rows of its commit. Run A's only cell, replaced by run B in call 1,
    must not come back from call 2's copy of A; and the latest run wins whatever order the archives are given."""
    committed = os.path.join(_results(str(tmp_path / "repo"), {"runA": [("logprobs", "cuda", 0.9)]}), "results")
    old = [("logprobs", "cuda", 0.9)]
    first = _results(str(tmp_path / "call1"), {"runA": old, "runB": [("logprobs", "cuda", 0.7)]})
    second = _results(str(tmp_path / "call2"), {"runA": old, "runC": [("gae", "triton", 0.1)]})
    sources = [first, second] if order == "as run" else [second, first]
    merge_gpu_results.merge(sources, "run9", committed, log=lambda s: None)
    merged = report.read_csv(os.path.join(committed, DEVICE, "results.csv"))
    rows = {(r["op"], r["provider"]): r["run_id"] for r in merged}
    assert rows == {("logprobs", "cuda"): "runB", ("gae", "triton"): "runC"}
    with open(os.path.join(committed, DEVICE, "run.log")) as fh:
        log = fh.read()
    assert log.index("cells of runB") < log.index("cells of runC")
