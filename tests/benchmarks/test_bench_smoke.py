"""Smoke test of the benchmark suite: the CLI runs on CPU with --quick and writes sane CSV / markdown / PNG.

Speed is not asserted (DESIGN.md §5); the test checks that the suite runs,
skips what cannot run with a reason, and that every number it writes is
finite, positive and self-consistent.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from rlhf_kernels import _ext
from tests.child_process import child_pytest_environment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_quick(out_dir: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the triton provider must be skipped, not interpreted
    env["MPLBACKEND"] = "Agg"
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--quick", "--fresh", "--no-progress",
        "--ops", "logprobs+ent,ppo_loss,gae", "--shapes", "64x512,64x1024", "--scan-shapes", "4x32",
        "--providers", "eager,chunked,liger,triton,cpu", "--mode", "fwd,fwd+bwd",
        "--rep-ms", "5", "--max-reps", "3", "--threads", "1", "--out", out_dir,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    start = time.monotonic()
    proc = _run_quick(out)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    dirs = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
    assert len(dirs) == 1 and dirs[0].startswith("cpu-") and dirs[0].endswith("-1t"), dirs
    return os.path.join(out, dirs[0]), proc, wall


def _rows(path):
    with open(os.path.join(path, "results.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def test_outputs_exist(quick_run):
    path, _, _ = quick_run
    for name in ("results.csv", "results.md", "summary.md", "meta.json", "run.log", "summary.png",
                 "logprobs_ent.png", "ppo_loss.png", "gae.png"):  # fmt: skip
        full = os.path.join(path, name)
        assert os.path.isfile(full) and os.path.getsize(full) > 0, name
        if name.endswith(".png"):
            with open(full, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_numbers_are_sane(quick_run):
    path, _, _ = quick_run
    rows = _rows(path)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["op"] for r in ok} == {"logprobs+ent", "ppo_loss", "gae"}
    assert {r["mode"] for r in ok if r["op"] != "gae"} == {"fwd", "fwd+bwd"}
    for r in ok:
        ms, p20, p80 = float(r["ms"]), float(r["ms_p20"]), float(r["ms_p80"])
        assert 0 < p20 <= ms <= p80 and math.isfinite(p80), r
        assert float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0, r
        assert float(r["pct_bw"]) == pytest.approx(100 * float(r["gbps"]) / float(r["copy_gbps"]), rel=1e-3)
        peak = float(r["peak_mb"]) if r["peak_mb"] else float("nan")
        assert math.isnan(peak) or peak >= 0, r
        assert r["device"] and r["torch"] and r["commit"], r
    # Every ok row of a group is compared with every other ok row of the same group, consistently.
    by_group = {}
    for r in ok:
        by_group.setdefault((r["op"], r["mode"], r["dtype"], r["shape"]), {})[r["provider"]] = r
    for group in by_group.values():
        for name, r in group.items():
            ratios = dict(kv.split("=") for kv in r["ratios"].split(";")) if r["ratios"] else {}
            assert set(ratios) == set(group) - {name}
            for other, value in ratios.items():
                assert float(value) == pytest.approx(float(group[other]["ms"]) / float(r["ms"]), rel=2e-3)
    # Fused vs eager: the bytes model makes a fwd+bwd pass move more than a fwd pass.
    lp = {(r["mode"], r["provider"]): r for r in ok if r["op"] == "logprobs+ent" and r["shape"] == "N=64 V=1024"}
    assert float(lp[("fwd+bwd", "eager")]["gbps"]) * float(lp[("fwd+bwd", "eager")]["ms"]) > float(
        lp[("fwd", "eager")]["gbps"]
    ) * float(lp[("fwd", "eager")]["ms"])


def test_unavailable_providers_are_skipped_with_a_reason(quick_run):
    path, proc, _ = quick_run
    rows = _rows(path)
    for provider in ("liger", "triton"):
        skipped = [r for r in rows if r["provider"] == provider]
        assert skipped and all(r["status"] == "skipped" and r["note"] for r in skipped), provider
    assert "triton skipped: " in proc.stderr
    text = open(os.path.join(path, "results.md")).read()
    assert "## logprobs+ent — fwd+bwd" in text and "## Skipped providers" in text
    assert "copy bandwidth" in open(os.path.join(path, "run.log")).read()


def test_wall_time_is_short(quick_run):
    _, _, wall = quick_run
    assert wall < 120, f"--quick smoke run took {wall:.0f} s"


def test_update_readme_rewrites_only_the_block(quick_run, tmp_path):
    path, _, _ = quick_run
    sys.path.insert(0, ROOT)
    from benchmarks import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n\n<!-- bench:start -->\nstale\n<!-- bench:end -->\n\nafter\n")
    results = os.path.dirname(path)
    assert update_readme.main(["--readme", str(readme), "--results", results]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\n\nafter\n")
    assert "stale" not in text and "summary.png" in text and "| logprobs+ent |" in text
    assert update_readme.main(["--readme", str(readme), "--results", results, "--check"]) == 0
    readme.write_text(text.replace("| logprobs+ent |", "| edited |"))
    assert update_readme.main(["--readme", str(readme), "--results", results, "--check"]) == 1


def test_update_readme_shows_the_end_to_end_steps(tmp_path):
    """A device folder with a trainer.md gets its table in the block, after a lead-in naming the model."""
    sys.path.insert(0, ROOT)
    from benchmarks import update_readme

    folder = tmp_path / "results" / "gpu-x"
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("| op |\n|---|\n| logprobs |\n")
    (folder / "trainer.md").write_text("# Trainer step: fused, eager (V=9 H=4 L=1 B=2 T=8)\n\nsome text\n\n"
                                       "| stage | ops | ms |\n|---|---|---|\n| sft | fused | 1.5 |\n")
    block = update_readme.render_block(str(tmp_path / "results"), str(tmp_path))
    assert "End-to-end training steps (V=9 H=4 L=1 B=2 T=8), against eager PyTorch" in block
    assert "| sft | fused | 1.5 |" in block and "some text" not in block
    assert "[trainer.md](results/gpu-x/trainer.md)" in block
    (folder / "trainer.md").unlink()
    assert "End-to-end" not in update_readme.render_block(str(tmp_path / "results"), str(tmp_path))


def test_commit_stamp_can_be_given(monkeypatch):
    """A runner with a stale .git passes the measured commit; without it the stamp is git's HEAD."""
    from benchmarks import common

    monkeypatch.delenv("RLHF_KERNELS_COMMIT", raising=False)
    head = common.git_commit()
    assert head and head != "abc123"
    monkeypatch.setenv("RLHF_KERNELS_COMMIT", "abc123")
    assert common.git_commit() == "abc123"


def test_coverage_counts_our_rows_and_prints_the_fill_command(tmp_path):
    """benchmarks.coverage: a cell counts once one of our GPU backends has an ok row; gaps get a run command."""
    from benchmarks import coverage

    header = ["op", "mode", "dtype", "shape", "provider", "status", "commit"]
    rows = [
        ["ppo_loss", "fwd", "bfloat16", "N=8192 V=151936", "triton", "ok", "abc"],
        ["ppo_loss", "fwd+bwd", "bfloat16", "N=8192 V=151936", "cuda", "ok", "abc"],
        ["ppo_loss", "fwd", "bfloat16", "N=4096 V=50257", "eager", "ok", "abc"],  # a competitor alone: not covered
        ["ppo_loss", "fwd", "bfloat16", "N=4096 V=128256", "cuda", "error", "abc"],  # failed: not covered
    ]
    device = tmp_path / "nvidia-test-gpu"
    device.mkdir()
    with open(device / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    cov = coverage.coverage(coverage.read_rows(str(device / "results.csv")))
    info = cov[("ppo_loss", "bfloat16", "fwd")]
    assert info["covered"] == ["N=8192 V=151936"] and len(info["missing"]) == 8
    assert info["providers"] == ["eager", "triton"] and info["commits"] == ["abc"]
    assert len(cov[("linear_ppo_loss", "bfloat16", "fwd+bwd")]["missing"]) == 18
    commands = coverage.fill_commands(cov)
    ppo = [c for c in commands if "--ops ppo_loss --dtypes bf16" in c]
    assert len(ppo) == 1 and "--shapes 4096x50257,4096x128256,4096x151936,8192x50257,8192x128256,16384x50257," in ppo[0]
    assert "8192x151936" not in ppo[0] and "--mode fwd,fwd+bwd" in ppo[0]
    out = tmp_path / "cov.md"
    assert coverage.main([str(device), "--out", str(out)]) == 0
    assert "2 of 255 cells" in out.read_text()


def test_profile_summary_pivots_ncu_csv(tmp_path):
    """benchmarks.profile_kernels --summarize: one row per kernel in launch order, ncu's preamble lines skipped."""
    from benchmarks import profile_kernels

    text = (
        "==PROF== Connected to process 1\n"
        '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'
        '"10","void rlhf_kernels::cuda::kl_fwd_kernel<float>(const float *)","SOL","DRAM Throughput","%","77.5"\n'
        '"2","_logprobs_fwd_kernel","SOL","Duration","us","1,143.2"\n'
        '"2","_logprobs_fwd_kernel","Occupancy","Achieved Occupancy","%","61.0"\n'
    )
    path = tmp_path / "ncu.csv"
    path.write_text(text)
    rows = profile_kernels.summarize(str(path)).splitlines()
    assert rows[2].startswith("| 2 | _logprobs_fwd_kernel | 1,143.2 us |") and "| 61.0 |" in rows[2]
    assert rows[3].startswith("| 10 | kl_fwd_kernel<float> |") and "| 77.5 |" in rows[3]


def test_stall_table_ranks_ncu_stall_reasons_per_kernel(tmp_path):
    """benchmarks.profile_kernels --stalls: ncu's raw page (header, units, one row per kernel) as reasons x kernels,
    the largest reasons first, other metrics ignored, thousands separators read."""
    from benchmarks import profile_kernels

    m = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    text = (
        "==PROF== Connected to process 1\n"
        f'"ID","Kernel Name","Block Size","Grid Size","{m.format("barrier")}","{m.format("long_scoreboard")}",'
        f'"{m.format("wait")}","dram__bytes.sum"\n'
        '"","","","","ratio","ratio","ratio","byte"\n'
        '"0","void rlhf_kernels::cuda::ppo_fwd_kernel<__nv_bfloat16, 1, 0>(const T1 *)","(256, 1, 1)",'
        '"(32768, 1, 1)","3.5","1,200.25","0.5","9"\n'
        '"1","void rlhf_kernels::cuda::ppo_fwd_kernel<__nv_bfloat16, 0, 0>(const T1 *)","(256, 1, 1)",'
        '"(8192, 1, 1)","0.25","4","0.75","9"\n'
    )
    path = tmp_path / "stalls.csv"
    path.write_text(text)
    rows = profile_kernels.stall_table(str(path), top=2).splitlines()
    assert "0: ppo_fwd_kernel<__nv_bfloat16, 1, 0> 32768x256" in rows[0] and "1: ppo_fwd_kernel" in rows[0]
    assert rows[2] == "| long_scoreboard | 1200.25 | 4.00 |"
    assert rows[3] == "| barrier | 3.50 | 0.25 |"  # wait (0.75 at most) is not in the top 2
    assert rows[4] == "| **all reasons** | 1204.25 | 5.00 |" and len(rows) == 5
    (tmp_path / "empty.csv").write_text('"ID","Kernel Name"\n"",""\n')
    with pytest.raises(ValueError, match="no stall-reason metrics"):
        profile_kernels.stall_table(str(tmp_path / "empty.csv"))


def test_sass_report_lists_the_forward_sweep_loops(tmp_path):
    from benchmarks import sass_report

    if not _ext.has_cuda_kernels() or sass_report.find_cuobjdump() is None:
        pytest.skip("needs the CUDA kernels and cuobjdump")
    out = tmp_path / "sass.md"
    assert sass_report.main(["--kernel", "logprobs_fwd", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| `logprobs_fwd_kernel<")]
    assert {r.split("`")[1] for r in rows} == {f"logprobs_fwd_kernel<{t}>" for t in ("bf16", "fp16", "fp32")}
    # each has at least one loop with its instruction count and the ex2 of the sweep in its mix
    assert all(int(r.split("|")[4]) >= 40 for r in rows) and any("MUFU" in r for r in rows)


@pytest.mark.skipif(not _ext.available(), reason="needs the C++ extension")
def test_cpu_kernel_microbenchmarks_run_and_report(tmp_path):
    """``make bench-cpu``'s kernel file at tiny shapes: every op's cpu / eager / chunked step runs, the outputs
    agree with eager's, and the report lists each op and mode."""
    report = tmp_path / "kernels.md"
    env = child_pytest_environment(RLHF_BENCH_N="32", RLHF_BENCH_V="300", RLHF_BENCH_B="2", RLHF_BENCH_T="16",
                                   RLHF_BENCH_ROUNDS="1", RLHF_BENCH_WARMUP="0", RLHF_BENCH_KERNELS_REPORT=str(report))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_cpu_kernels.py"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text()
    for op in ("logprobs+ent", "kl_divergence", "ppo_loss", "gae"):
        assert f"| {op} | fwd |" in text, text
    assert "| ppo_loss | fwd+bwd |" in text


def test_host_overhead_reports_every_case_and_removes_its_stub(tmp_path, capsys):
    from benchmarks import host_overhead
    from rlhf_kernels import _ext

    assert host_overhead.main(["--reps", "1", "--calls", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "host_overhead.md").read_text()
    cases = ["logprobs fwd", "logprobs fwd+bwd", "kl_divergence fwd+bwd", "ppo_loss fwd (no grad)", "ppo_loss fwd+bwd"]
    if _ext.has_cuda_kernels():
        cases += ["ppo_loss cuda-path fwd+bwd", "ppo_loss cuda-path fwd+bwd, GRPO"]
        x = torch.zeros(1, 2, 8)
        rows = torch.zeros(1, 2)
        with pytest.raises(NotImplementedError):  # the CPU stub is gone with the run
            torch.ops.rlhf_kernels_C.ppo_fwd_loss(x, torch.zeros(1, 2, dtype=torch.long), rows, rows, None, rows, 0,
                                                  1.0, -100, 0.0, 3, 0.0, 0.2, 0.2, None, 0, None)
    for case in cases:
        row = next(line for line in text.splitlines() if line.startswith(f"| {case} |"))
        assert float(row.split("|")[2]) > 0, row
    assert text == capsys.readouterr().out
    with pytest.raises(SystemExit, match="--reps and --calls"):
        host_overhead.main(["--reps", "0"])


def test_trainer_benchmark_runs_every_stage_and_variant(tmp_path, capsys):
    """bench_trainer at a tiny size: every stage and variant timed (finite, positive), the CSV and table written."""
    from benchmarks import bench_trainer

    # --seq 72: beyond PPOConfig's default n_positions (64), which the bench's own model must override
    args = ["--vocab", "256", "--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--batch", "4", "--seq", "72",
            "--warmup", "1", "--reps", "1", "--threads", "1", "--out", str(tmp_path)]
    assert bench_trainer.main(args) == 0
    (folder,) = os.listdir(tmp_path)
    with open(os.path.join(tmp_path, folder, "trainer.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["stage"], r["ops"]) for r in rows} == {
        (s, v) for s in ("sft", "ppo-exp", "ppo-update") for v in ("fused", "fused-head", "eager")
    } | {("rm", "fused"), ("rm", "eager")}
    assert all(math.isfinite(float(r["ms"])) and float(r["ms"]) > 0 for r in rows)
    assert "| sft | fused |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--shapes", "12x"], "--shapes entries are NxV"),
    (["--shapes", "0x5"], "--shapes entries are NxV"),
    (["--scan-shapes", "axb"], "--scan-shapes entries are"),
    (["--hidden", "64,zero"], "--hidden must be a comma list of positive integers"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--max-reps", "0"], "--max-reps must be >= 1"),
    (["--rep-ms", "-5"], "--rep-ms must be > 0"),
    (["--time-budget", "0"], "--time-budget must be > 0"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--ops", "logprobs,ppo_los"], "unknown --ops ['ppo_los']"),
    (["--mode", "fwd,backward"], "--mode must be among"),
    (["--providers", "eager,liger-kernel"], "--providers must be among"),
    (["--dtypes", "bf16,int8"], "--dtypes must be among"),
])  # fmt: skip
def test_malformed_flags_are_usage_errors_before_anything_is_written(flags, message, tmp_path, capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit) as exited:
        main(flags + ["--out", str(tmp_path), "--no-progress"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no results folder, no run.log


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where there is no GPU")
def test_device_cuda_without_a_gpu_ends_the_run_saying_so(tmp_path):
    from benchmarks.run import main

    with pytest.raises(SystemExit, match=r"--device: device 'cuda': no CUDA device is available here"):
        main(["--device", "cuda", "--ops", "gae", "--out", str(tmp_path), "--no-progress"])


def _fake_measure(calls, interrupt_at=None):
    """``run.measure`` stand-in: records (provider, mode), returns a fixed timing, or raises KeyboardInterrupt
    (a SIGINT at the deadline) on the call numbered ``interrupt_at``."""
    from benchmarks import common

    def measure(spec, case, name, sets, mode, device, timer):
        calls.append((name, mode))
        if interrupt_at is not None and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        ms = {"eager": 4.0, "chunked": 2.0, "cpu": 1.0}[name]
        return {"status": "ok", "timing": common.Timing(ms, ms, ms, 3), "peak": 0}

    return measure


def test_a_cut_run_keeps_its_finished_providers_and_resume_measures_only_the_rest(tmp_path, monkeypatch):
    """Rows are written after every provider, so a run stopped inside a case (a long torch.compile warm-up at
    the GPU deadline) keeps the providers it finished; ``--resume`` then measures only the missing rows, and
    its ratios include the kept ones."""
    from benchmarks import report, run

    flags = ["--ops", "logprobs", "--shapes", "8x64", "--dtypes", "fp32", "--mode", "fwd,fwd+bwd",
             "--providers", "eager,chunked,cpu", "--threads", "1", "--no-progress", "--no-plots",
             "--out", str(tmp_path)]
    first: list = []
    monkeypatch.setattr(run, "measure", _fake_measure(first, interrupt_at=4))  # fwd: 3 providers, fwd+bwd: 1
    with pytest.raises(KeyboardInterrupt):
        run.main(flags + ["--fresh"])
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    kept = {(r["mode"], r["provider"]) for r in report.read_csv(str(folder / "results.csv"))}
    assert kept == {("fwd", "eager"), ("fwd", "chunked"), ("fwd", "cpu")}

    second: list = []
    monkeypatch.setattr(run, "measure", _fake_measure(second))
    assert run.main(flags + ["--resume"]) == 0
    assert second == [("eager", "fwd+bwd"), ("chunked", "fwd+bwd"), ("cpu", "fwd+bwd")]
    rows = {(r["mode"], r["provider"]): r for r in report.read_csv(str(folder / "results.csv"))}
    assert set(rows) == {(m, p) for m in ("fwd", "fwd+bwd") for p in ("eager", "chunked", "cpu")}

    third: list = []
    monkeypatch.setattr(run, "measure", _fake_measure(third))
    rows_before = dict(rows)
    del_key = ("fwd+bwd", "cpu")  # drop one row: the rerun measures it alone, its ratios from the kept rows
    keep = [r for k, r in rows_before.items() if k != del_key]
    report.write_csv(str(folder / "results.csv"), keep)
    assert run.main(flags + ["--resume"]) == 0
    assert third == [("cpu", "fwd+bwd")]
    cpu = {(r["mode"], r["provider"]): r for r in report.read_csv(str(folder / "results.csv"))}[del_key]
    assert cpu["ratios"] == "eager=4;chunked=2"
