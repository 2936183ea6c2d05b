"""A dry run of ``benchmarks/gpu_suite.sh`` on the CPU: every stage, with the suite's python, ``compute-sanitizer``,
``ncu`` and ``nvidia-smi`` replaced by a recorder, then every recorded command checked as its program would check it.

Why: a lent GPU gives the project 15 minutes now and then. A misspelt flag, an op or provider name a benchmark no
longer knows, a moved script or a bad ``RLHF_KERNELS_*`` value in the suite would only show there, and cost a stage
of those minutes. Here each recorded ``python -m benchmarks.<tool> ...`` goes through that tool's own argument
parser (and ``benchmarks.run``'s ``check_args``), each ``python -c`` snippet is compiled, each script path must exist,
each pytest mark expression may name only registered marks, and the environment each command saw must pass
``rlhf_kernels.settings.check()``. Nothing is timed or run on a device.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
RECORDED_TOOLS = ("python", "compute-sanitizer", "ncu", "nvidia-smi")

# Every call appends [tool, argv..., {RLHF_KERNELS_* env}] as one JSON line. The suite's `-c` probes see a CUDA device
# (so every GPU stage runs) and an extension without CUDA kernels (so the build step runs too, as pip is recorded).
RECORDER = """#!{python}
import json, os, sys
tool = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith("RLHF_KERNELS_")}}
with open(os.environ["DRY_RUN_LOG"], "a") as fh:
    fh.write(json.dumps([tool] + sys.argv[1:] + [env]) + "\\n")
if tool == "python" and sys.argv[1:2] == ["-c"] and "has_cuda_kernels" in sys.argv[2]:
    sys.exit(1)
"""


def _suite_stages() -> list:
    """The names the suite's STAGES line accepts, composites (bench, grid, all, priority) included."""
    with open(SUITE) as fh:
        (line,) = [s for s in fh if s.startswith("STAGES=")]
    return line.split("=", 1)[1].strip().strip('"').split()


# The suite's defaults, and the settings NOTES (H200) plans for the next run's calls
SUITE_SETTINGS = {
    "defaults": {},
    "next-run": {"HEADLINE_SHAPES": "4096x50257,8192x151936", "BENCH_PROVIDERS": "triton,cuda,liger",
                 "LINEAR_HEADLINE_OPS": "linear_logprobs,linear_cross_entropy,linear_ppo_loss",
                 "LINEAR_HEADLINE_SHAPES": "4096x50257x2048,8192x50257x4096", "RLHF_KERNELS_COMMIT": "0" * 40},
}


@pytest.fixture(scope="module", params=sorted(SUITE_SETTINGS))
def dry_run(request, tmp_path_factory):
    """Runs every stage of the suite once under the recorder; returns (completed process, calls, suite log)."""
    tmp = tmp_path_factory.mktemp("gpu_suite")
    bin_dir, out, log = tmp / "bin", tmp / "out", tmp / "calls.jsonl"
    bin_dir.mkdir()
    for tool in RECORDED_TOOLS:
        path = bin_dir / tool
        path.write_text(RECORDER.format(python=sys.executable))
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "GPU_", "BENCH_", "TAR_OUT"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHON=str(bin_dir / "python"), OUT=str(out),
               DRY_RUN_LOG=str(log), GPU_DEADLINE="100000")  # a deadline far off: every command goes through `timeout`
    env.update(SUITE_SETTINGS[request.param])
    proc = subprocess.run(["bash", SUITE, *_suite_stages()], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return proc, calls, (out / "gpu_suite.log").read_text()


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a tool's parser has accepted its arguments."""


def _parse_then_stop(self, args=None, namespace=None):
    _ORIGINAL_PARSE_ARGS(self, args, namespace)
    raise _Parsed


_ORIGINAL_PARSE_ARGS = argparse.ArgumentParser.parse_args


def _check_module_arguments(module_name: str, argv: list) -> None:
    """``python -m module_name *argv`` as far as its argument checks: a usage error fails the test, naming the call."""
    module = importlib.import_module(module_name)
    try:
        if hasattr(module, "build_parser") and hasattr(module, "check_args"):
            parser = module.build_parser()
            module.check_args(parser, parser.parse_args(argv))
            return
        with mock.patch.object(argparse.ArgumentParser, "parse_args", _parse_then_stop):
            status = module.main(argv)  # a main without parse_args (the CLI's `info`) runs: it must succeed
    except _Parsed:
        return
    except SystemExit as exc:
        pytest.fail(f"python -m {module_name} {' '.join(argv)}: its parser refused the suite's arguments ({exc})")
    assert status in (0, None), f"python -m {module_name} {' '.join(argv)} returned {status}"


def _python_commands(calls: list) -> list:
    """Every python command line the suite ran, directly or under compute-sanitizer / ncu: (argv, env)."""
    commands = []
    for call in calls:
        tool, argv, env = call[0], call[1:-1], call[-1]
        if tool == "python":
            commands.append((argv, env))
        elif tool in ("compute-sanitizer", "ncu"):
            (at,) = [i for i, a in enumerate(argv) if os.path.basename(a) == "python"]
            commands.append((argv[at + 1:], env))
    return commands


def test_every_stage_runs_to_the_end_without_a_failure_note(dry_run):
    proc, calls, suite_log = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for problem in ("unknown stage", "failed", "exited", "skipped", "not found", "crashed"):
        assert problem not in suite_log, suite_log
    assert "done (rc=0)" in suite_log


def test_every_benchmark_tool_of_the_suite_is_reached(dry_run):
    """So the checks below cover each stage: the tools the stages call, each seen at least once."""
    modules = {argv[1] for argv, _ in _python_commands(dry_run[1]) if argv[:1] == ["-m"]}
    assert {"benchmarks.run", "benchmarks.exception_probe", "benchmarks.probe_ppo", "benchmarks.gemm_alignment",
            "benchmarks.step_profile", "benchmarks.tune_cuda", "benchmarks.tune_triton", "benchmarks.profile_kernels",
            "benchmarks.coverage", "benchmarks.preference", "rlhf_kernels.cli", "pytest", "pip"} <= modules
    tools = {call[0] for call in dry_run[1]}
    assert {"compute-sanitizer", "ncu", "nvidia-smi"} <= tools


def test_every_recorded_command_passes_its_programs_own_checks(dry_run, monkeypatch, pytestconfig):
    from rlhf_kernels import settings

    marks = {line.split(":", 1)[0].strip() for line in pytestconfig.getini("markers")}  # pyproject.toml's
    checked = 0
    for argv, env in _python_commands(dry_run[1]):
        for name in [k for k in os.environ if k.startswith("RLHF_KERNELS_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        problems = {k: p for k, (_, p) in settings.check().items() if p}
        assert not problems, f"{argv}: {problems}"
        if argv[0] == "-c":
            compile(argv[1], "<python -c>", "exec")
        elif argv[:2] == ["-m", "pytest"]:
            expression = argv[argv.index("-m", 2) + 1]
            named = set(re.findall(r"\w+", expression)) - {"and", "or", "not"}
            assert named <= marks, f"pytest -m {expression!r} names marks pyproject.toml does not register"
        elif argv[:2] == ["-m", "pip"]:
            continue
        elif argv[0] == "-m":
            _check_module_arguments(argv[1], argv[2:])
        else:
            assert os.path.isfile(os.path.join(ROOT, argv[0])), f"the suite runs a script that is not there: {argv}"
        checked += 1
    assert checked >= 30


def test_the_sanitizers_run_are_compute_sanitizers_tools(dry_run):
    runs = [call[1:-1] for call in dry_run[1] if call[0] == "compute-sanitizer"]
    tools = [argv[argv.index("--tool") + 1] for argv in runs]
    assert sorted(tools) == sorted(["memcheck"] * 2 + ["racecheck", "synccheck"] * 2)  # the stage alone, then priority
