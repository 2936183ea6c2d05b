"""The CUDA kernels' device code built as host C++ (``row_stats_emulation.cpp``) and loaded through ctypes: the
``emu`` fixture of the emulation tests, once per floating-point build (one session-wide library each)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "cuda" / "row_stats_emulation.cpp"


def _cuda_include_dir() -> Path | None:
    """A directory with the CUDA runtime headers (toolkit, or the pip CUDA / Triton copies)."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]
    candidates = [Path(r) / "include" for r in roots if r]
    for site in map(Path, sys.path):
        candidates += sorted(site.glob("nvidia/cu*/include")) + [site / "nvidia" / "cuda_runtime" / "include"]
        candidates.append(site / "triton" / "backends" / "nvidia" / "include")
    for d in candidates:
        if (d / "cuda_bf16.h").exists() and (d / "cuda_runtime.h").exists():
            return d
    return None


def _cpu_has_fma() -> bool:
    try:
        return platform.machine() in ("x86_64", "AMD64") and " fma " in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# "contracted": a*b + c fused into one FMA wherever the compiler likes, as nvcc does on the GPU, so a
# product that must be rounded on its own (mul_rn: exact zeros, logp <= 0) is checked here too.
BUILDS = {"exact": ["-ffp-contract=off"], "contracted": ["-mfma", "-ffp-contract=fast"]}


def _built_library(cxx: str, include: Path, build: str, tmp_path_factory) -> Path:
    """The emulation compiled with ``BUILDS[build]`` (~13 s each on 2 cores). Under pytest-xdist the workers of one run
    share the build (their base temp directories' parent is the run's own), so each is compiled once per run
    rather than once per worker that has an emulation test file."""
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    directory = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.mktemp("emu")
    lib_path = directory / f"librow_stats_emulation_{build}.so"
    with FileLock(str(lib_path) + ".lock"):
        if not lib_path.exists():
            partial = lib_path.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", *BUILDS[build], "-x", "c++",
                   f"-I{ROOT / 'csrc' / 'cuda'}", f"-I{include}", str(SOURCE), "-o", str(partial)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, f"compiling the emulation failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}"
            partial.rename(lib_path)
    return lib_path


@pytest.fixture(scope="session", params=tuple(BUILDS))
def emu(request, tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    include = _cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    if request.param == "contracted" and not _cpu_has_fma():
        pytest.skip("this CPU has no FMA instructions")
    lib = ctypes.CDLL(str(_built_library(cxx, include, request.param, tmp_path_factory)))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.rk_emulate_logprobs.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, f32, i64, ctypes.c_int, ctypes.c_int,
                                        ptr, ptr, ptr]
    lib.rk_emulate_kl.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, i64, f32, ctypes.c_int, ptr, ptr, ptr]
    lib.rk_emulate_logprobs_bwd.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32,
                                            i64, i64, ctypes.c_int]
    lib.rk_emulate_kl_bwd.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64,
                                      f32, i64, ctypes.c_int]
    lib.rk_emulate_fused_grad.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32, i64,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr]
    lib.rk_emulate_fused_grad_pipe.argtypes = [ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, f32, i64,
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr]
    lib.rk_emulate_loss_aggregate.argtypes = [ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ptr, ptr, ptr, ptr,
                                              ptr, ptr]
    lib.rk_emulate_ppo_token.argtypes = [ptr, ptr, ptr, ptr, i64, f32, f32, ctypes.c_int, f32, ctypes.c_int, ptr, ptr,
                                         ptr, ptr, ptr]
    lib.rk_emulate_ppo_rows.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, f32, i64, ctypes.c_int, ctypes.c_int,
                                        ptr, ptr, ptr, ptr, f32, ctypes.c_int, f32, f32, f32, ctypes.c_int, f32, ptr,
                                        ptr]
    for fn in (lib.rk_emulate_logprobs, lib.rk_emulate_kl, lib.rk_emulate_logprobs_bwd, lib.rk_emulate_fused_grad,
               lib.rk_emulate_fused_grad_pipe, lib.rk_emulate_kl_bwd, lib.rk_emulate_loss_aggregate,
               lib.rk_emulate_ppo_token, lib.rk_emulate_ppo_rows):
        fn.restype = ctypes.c_int
    return lib
